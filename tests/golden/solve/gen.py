"""Golden values for modelfusion::solve, from scipy and POT.

Run with the project venv:  venv/bin/python tests/golden/solve/gen.py
Writes tests/golden/solve/golden.json (read by tests/solve/solve_golden.rs).
"""
import json
import os

import numpy as np
import ot
import scipy
from scipy.optimize import linear_sum_assignment

rng = np.random.default_rng(20261127)
lap_cases = []


def add_lap(name, cost, maximize=False, unique=True):
    r, c = linear_sum_assignment(cost, maximize=maximize)
    lap_cases.append(
        {
            "name": name,
            # JSON has no infinity: forbidden (+inf) entries are written as null
            "cost": [[None if np.isinf(v) else v for v in row] for row in cost.tolist()],
            "maximize": maximize,
            "total": float(cost[r, c].sum()),
            "rows": r.tolist(),
            "cols": c.tolist(),
            # indices are compared only where the optimum is unique (no ties)
            "unique": unique,
        }
    )


add_lap("uniform 5x5", rng.random((5, 5)))
add_lap("integer ties 8x8", rng.integers(0, 4, (8, 8)).astype(float), unique=False)
add_lap("wide 10x20", rng.random((10, 20)))
add_lap("tall 20x10", rng.random((20, 10)))
add_lap("uniform 50x50", rng.random((50, 50)))
A, B = rng.standard_normal((30, 16)), rng.standard_normal((30, 16))
add_lap("weight matching 30x30 maximise", A @ B.T, maximize=True)
c = rng.random((7, 7))
c[rng.random((7, 7)) < 0.3] = np.inf
np.fill_diagonal(c, rng.random(7))  # keep it feasible
add_lap("forbidden +inf 7x7", c)
add_lap("integer 40x25 maximise", rng.integers(0, 100, (40, 25)).astype(float), True, False)

sk_cases = []


def add_sk(name, a, b, M, reg, reg_m=None):
    if reg_m is None:
        P = ot.sinkhorn(a, b, M, reg, method="sinkhorn_log", stopThr=1e-14, numItermax=100000)
    else:
        P = ot.unbalanced.sinkhorn_unbalanced(
            a, b, M, reg, reg_m, method="sinkhorn", reg_type="entropy",
            stopThr=1e-15, numItermax=100000,
        )
    sk_cases.append(
        {
            "name": name,
            "a": a.tolist(),
            "b": b.tolist(),
            "cost": M.tolist(),
            "reg": reg,
            "reg_m": reg_m,
            "plan": P.tolist(),
            "transport_cost": float((P * M).sum()),
        }
    )


x, y = rng.standard_normal((10, 3)), rng.standard_normal((15, 3))
M = ot.dist(x, y)
M /= M.max()
add_sk("dirichlet 10x15 reg 0.05", rng.dirichlet(np.ones(10)), rng.dirichlet(np.ones(15)), M, 0.05)
x, y = rng.standard_normal((30, 5)), rng.standard_normal((30, 5))
M = ot.dist(x, y)
M /= M.max()
u = np.ones(30) / 30
add_sk("uniform 30x30 reg 0.1", u, u, M, 0.1)
add_sk("uniform 30x30 reg 0.02", u, u, M, 0.02)
x, y = rng.standard_normal((12, 2)), rng.standard_normal((9, 2))
M = ot.dist(x, y)
M /= M.max()
add_sk("unbalanced 12x9 reg 0.1 reg_m 1", rng.random(12) + 0.1, rng.random(9) + 0.1, M, 0.1, 1.0)

emd_cases = []
for n in (6, 20):
    x, y = rng.standard_normal((n, 2)), rng.standard_normal((n, 2))
    M = ot.dist(x, y)
    w = np.ones(n) / n
    emd_cases.append({"cost": M.tolist(), "emd": float(ot.emd2(w, w, M))})

out = {
    "generator": f"numpy {np.__version__}, scipy {scipy.__version__}, POT {ot.__version__}",
    "lap": lap_cases,
    "sinkhorn": sk_cases,
    "exact_ot": emd_cases,
}
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden.json")
with open(path, "w") as f:
    json.dump(out, f, allow_nan=False)
print("wrote", path)
