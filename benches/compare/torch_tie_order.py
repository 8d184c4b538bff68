"""Does torch's CPU sort decide which entries tied at a top-k cut are kept from the
tied entries' positions alone? mergekit's TIES keeps `torch.argsort(|tau|,
descending=True)[:k]`; if the kept tied entries depended only on where the tied
entries are (and how many lie above the cut), a streaming merge could find them
without holding the tensor. This script searches (seeded) for two tensors with the
same tied positions and the same entries above the cut, differing only in the value
of one entry above the cut, for which torch keeps different tied entries, and prints
the first pair found: a counterexample, so the replay needs every key.

    venv/bin/python benches/compare/torch_tie_order.py
"""
import random

import torch


def kept_ties(w, k, v):
    idx = torch.argsort(w, descending=True)[:k].tolist()
    return sorted(i for i in idx if w[i].item() == v)


def main():
    rng = random.Random(1)
    for _ in range(5000):
        n = rng.randint(24, 120)
        vals = [rng.choice([1.0, 2.0, 3.0]) if rng.random() < 0.7 else rng.random() * 4
                for _ in range(n)]
        w = torch.tensor(vals, dtype=torch.float32)
        k = rng.randint(1, n - 1)
        v = torch.sort(w, descending=True).values[k - 1].item()
        tied = [i for i in range(n) if vals[i] == v]
        kept = kept_ties(w, k, v)
        if not kept or len(kept) == len(tied):
            continue  # the cut does not split the tie
        for j in range(n):
            if vals[j] <= v:
                continue
            w2 = w.clone()
            w2[j] = v + 0.5 + rng.random()  # still above the cut
            kept2 = kept_ties(w2, k, v)
            if kept2 != kept:
                print(f"torch {torch.__version__}: n = {n}, k = {k}, cut value {v}, "
                      f"{len(tied)} tied entries at positions {tied}")
                print(f"  entry {j} = {vals[j]:.6f}: torch keeps the tied entries {kept}")
                print(f"  entry {j} = {w2[j].item():.6f}: torch keeps the tied entries {kept2}")
                print(f"  values: {[round(x, 6) for x in vals]}")
                return
    print("no counterexample found")


if __name__ == "__main__":
    main()
