"""Golden masks of mergekit 0.1.5's SCE selection (`sce_mask`: variance over models,
torch CPU `topk`, whose ties libstdc++'s partial_sort / nth_element split), on
tie-heavy f32 task vectors. Run with a venv holding mergekit:
    venv-mk/bin/python tests/golden/mergekit/gen_sce.py
Writes sce_topk.json next to it (task vectors as small integers times 2^-7, exact in
f32; one mask character per entry)."""
import json, os
import torch
from mergekit.merge_methods.sce import sce_mask

HERE = os.path.dirname(os.path.abspath(__file__))
g = torch.Generator().manual_seed(23)
cases = []
for k, n, levels in [(2, 50, 2), (3, 1000, 3), (3, 5000, 2), (2, 20000, 4), (4, 3000, 6)]:
    q = torch.randint(-levels, levels + 1, (k, n), generator=g)
    tvs = q.float() / 128.0
    group = {"q": q.tolist(), "cases": []}
    cases.append(group)
    for density in [0.01, 0.1, 0.37, 0.5, 0.7, 0.9]:
        m = sce_mask(tvs, density)
        group["cases"].append({"select_topk": density, "kept": "".join("1" if v else "0" for v in (m != 0).tolist())})
with open(os.path.join(HERE, "sce_topk.json"), "w") as f:
    json.dump(cases, f, separators=(",", ":"))
    f.write("\n")
