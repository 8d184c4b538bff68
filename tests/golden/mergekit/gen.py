"""Golden masks of mergekit 0.1.5's magnitude trimming (torch CPU sort, ties split by
libstdc++ introsort): `magnitude` (TIES) and `magnitude_outliers` (breadcrumbs), on
tie-heavy f32 deltas. Run with a venv holding mergekit:
    venv-mk/bin/python tests/golden/mergekit/gen.py
Writes trim.json next to it (inputs as small integers times 2^-7, exact in f32)."""
import json, os
import torch
from mergekit.sparsify import magnitude, magnitude_outliers

HERE = os.path.dirname(os.path.abspath(__file__))
g = torch.Generator().manual_seed(17)
cases = []
for n, levels in [(40, 3), (1000, 5), (5000, 40), (30000, 9)]:
    q = torch.randint(-levels, levels + 1, (n,), generator=g)
    x = q.float() / 128.0
    group = {"q": q.tolist(), "cases": []}
    cases.append(group)
    for density in [0.1, 0.37, 0.5, 0.9]:
        m = "".join("1" if v else "0" for v in (magnitude(x, density) != 0).tolist())
        group["cases"].append({"method": "magnitude", "density": density, "gamma": 0.0, "kept": m})
    for density, gamma in [(0.5, 0.01), (0.3, 0.2), (0.9, 0.05)]:
        m = "".join("1" if v else "0" for v in (magnitude_outliers(x, density, gamma=gamma) != 0).tolist())
        group["cases"].append({"method": "magnitude_outliers", "density": density, "gamma": gamma, "kept": m})
with open(os.path.join(HERE, "trim.json"), "w") as f:
    json.dump(cases, f, separators=(",", ":"))
    f.write("\n")
