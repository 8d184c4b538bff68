"""Golden values for modelfusion::merge::{IsoC, TsvMerge}, computed with torch.linalg.svd
as the authors describe the methods (written from the papers and their published
algorithm descriptions, not copied):

- Iso-C (Marczak et al. 2025): for a 2-D parameter, D = sum_i tau_i = U S V^T and the
  update is mean(S) * U V^T; any other parameter gets the mean task vector.
- TSV-Merge (Gargiulo et al. 2025): for a 2-D parameter with r = min(rows, cols) and T
  tasks, each tau_i keeps its top k = floor(r / T) singular triplets; the kept U's are
  placed side by side in an (rows x r) matrix (zero-padded, as the authors' code does),
  the kept V^T's stacked in an (r x cols) matrix, each orthogonalised by the product of
  its own SVD factors (polar factor), and the update is P_U diag(S) P_V; any other
  parameter gets the mean task vector.
The merge is base + alpha * update. Everything in float64.

Run: venv/bin/python tests/golden/merge/gen_svd.py   (writes svd.json next to it)
"""
import json
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
torch.manual_seed(20261201)


def t(a):
    return {"shape": list(a.shape), "data": a.reshape(-1).tolist()}


def iso_c(taus):
    if taus[0].dim() != 2:
        return sum(taus) / len(taus)
    d = sum(taus)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return u @ torch.diag(torch.full_like(s, s.mean().item())) @ vh


def tsv(taus):
    if taus[0].dim() != 2:
        return sum(taus) / len(taus)
    rows, cols = taus[0].shape
    r = min(rows, cols)
    k = r // len(taus)
    su = torch.zeros(rows, r, dtype=torch.float64)
    ss = torch.zeros(r, dtype=torch.float64)
    sv = torch.zeros(r, cols, dtype=torch.float64)
    for i, tau in enumerate(taus):
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        su[:, i * k:(i + 1) * k] = u[:, :k]
        ss[i * k:(i + 1) * k] = s[:k]
        sv[i * k:(i + 1) * k, :] = vh[:k, :]
    uu, _, vu = torch.linalg.svd(su, full_matrices=False)
    uv, _, vv = torch.linalg.svd(sv, full_matrices=False)
    return torch.linalg.multi_dot((uu, vu, torch.diag(ss), uv, vv))


cases = []
for shapes, count, alpha in [
    ({"fc.weight": (6, 4), "fc.bias": (6,)}, 2, 1.0),
    ({"a.weight": (5, 9), "a.bias": (5,), "norm": (9,)}, 3, 1.3),
    ({"w": (8, 8), "conv": (2, 3, 2, 2)}, 2, 0.7),
    ({"w": (12, 7)}, 3, 1.0),
]:
    base = {n: torch.randn(s, dtype=torch.float64) for n, s in shapes.items()}
    models = [{n: base[n] + 0.3 * torch.randn(s, dtype=torch.float64) for n, s in shapes.items()}
              for _ in range(count)]
    out = {}
    for method, f in [("iso_c", iso_c), ("tsv", tsv)]:
        out[method] = {n: t(base[n] + alpha * f([m[n] - base[n] for m in models])) for n in shapes}
    cases.append({
        "alpha": alpha,
        "base": {n: t(v) for n, v in base.items()},
        "models": [{n: t(v) for n, v in m.items()} for m in models],
        **out,
    })

with open(os.path.join(HERE, "svd.json"), "w") as f:
    json.dump(cases, f)
print(f"wrote {len(cases)} cases to svd.json")
