#!/usr/bin/env python3
"""PyTorch check of `modelfusion permute` / `align` on the transformer fixtures of gen.py.

For every family NAME under tests/golden/transformers/ and seeds 1..3:

  permute   `modelfusion permute NAME --seed S -o T/p` (spec inferred from the tensors and
            config.json; config.json copied beside): the permuted folder loads with the
            family's `from_pretrained` and gives the committed logits on the committed input
            (max abs diff < 1e-4, f32); `moved` counts the attention heads whose Q rows
            moved and the Q rows whose position within their head changed (so heads and
            within-head dimensions were permuted, not only the MLP and residual stream).
  undo      `modelfusion align NAME T/p -o T/a`: weight matching
            recovers the original weights exactly (max abs diff 0).

Negative controls (the checks can fail): with rotary embeddings (llama), permuting the
rotary pair indices of Q and K (the same permutation of pairs in both halves of the
`rotate_half` layout) changes the logits; so does permuting the rows of one head's V
without the matching columns of O.

Output: one line per check, printed and written to tests/golden/transformers/check_torch.txt;
exit status 1 on any failure.

Run (from the crate root):
    cargo build --release --features cli
    venv-mk/bin/python tests/golden/transformers/check_torch.py   # $MODELFUSION_BIN overrides
                                                                  # target/release/modelfusion
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, HERE)
import gen  # noqa: E402

TOL = 1e-4
BIN = os.environ.get("MODELFUSION_BIN", os.path.join(REPO, "target", "release", "modelfusion"))


def cls_of(name):
    for fam, cls, _ in gen.families():
        if fam == name:
            return cls
    raise KeyError(name)


def logits_of(name, folder, io):
    """Logits of the checkpoint in `folder` (model.safetensors + config.json), loaded by
    `from_pretrained` (transformers 5 converts its saved names to the modules' own)."""
    model = cls_of(name).from_pretrained(folder, attn_implementation="eager").eval()
    x = {k: v for k, v in io.items() if k != "logits"}
    with torch.no_grad():
        return model(**x).logits.float()


def with_weights(name, weights, work, tag):
    """A folder with `weights` and the fixture's config.json."""
    folder = os.path.join(work, f"{name}-{tag}")
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(HERE, name, "config.json"), folder)
    save_file(weights, os.path.join(folder, "model.safetensors"))
    return folder


def q_rows_moved(orig, perm, heads, head_dim):
    """(heads whose Q rows moved, Q rows moved within their head) over all layers."""
    keys = [k for k in orig if k.endswith(("q_proj.weight", "self.query.weight",
                                           "attention.query.weight", "q_lin.weight",
                                           "c_attn.weight"))]
    moved_heads = moved_dims = 0
    for k in keys:
        a, b = orig[k], perm[k]
        if k.endswith("c_attn.weight"):  # Conv1D (in, out), fused: Q is the first third
            a, b = a[:, : heads * head_dim].T, b[:, : heads * head_dim].T
        # A permuted Q row is an original row with its entries reordered by the residual
        # permutation: rows are found by their sorted values (distinct in random weights).
        sa, sb = a.sort(dim=1).values, b.sort(dim=1).values
        src = [int(torch.nonzero((sa == row).all(dim=1))[0]) for row in sb]
        for h in range(heads):
            rows = src[h * head_dim:(h + 1) * head_dim]
            moved_heads += rows[0] // head_dim != h
            moved_dims += sum(r % head_dim != i for i, r in enumerate(rows))
    return moved_heads, moved_dims


def run(args):
    r = subprocess.run([BIN] + args, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
    return r.stderr


def heads_of(name):
    with open(os.path.join(HERE, name, "config.json")) as f:
        c = json.load(f)
    heads = c.get("num_attention_heads") or c.get("n_head") or c["n_heads"]
    hidden = c.get("hidden_size") or c.get("n_embd") or c["dim"]
    return heads, c.get("head_dim") or hidden // heads, c.get("num_key_value_heads", heads)


def negative_controls(lines, work):
    """Changes that must break the function, so the comparisons above can fail."""
    name = "llama"
    orig = load_file(os.path.join(HERE, name, "model.safetensors"))
    io = load_file(os.path.join(HERE, name, "io.safetensors"))
    heads, d, kv = heads_of(name)
    pairs = torch.randperm(d // 2, generator=torch.Generator().manual_seed(0))
    within = torch.cat([pairs, pairs + d // 2])  # same pair permutation in both halves
    bad = dict(orig)
    for k, n in [("q_proj", heads), ("k_proj", kv)]:
        key = f"model.layers.0.self_attn.{k}.weight"
        idx = torch.cat([h * d + within for h in range(n)])
        bad[key] = orig[key][idx]
    out = logits_of(name, with_weights(name, bad, work, "rotary-pairs"), io)
    diff = (out - io["logits"]).abs().max().item()
    lines.append(check_line(name, "neg_rotary_pairs", diff, diff > TOL,
                            f"pair permutation {pairs.tolist()} of Q and K heads must change the logits"))
    bad = dict(orig)
    key = "model.layers.0.self_attn.v_proj.weight"
    idx = torch.arange(bad[key].shape[0])
    idx[:d] = idx[:d].flip(0)
    bad[key] = orig[key][idx]
    out = logits_of(name, with_weights(name, bad, work, "v-only"), io)
    diff = (out - io["logits"]).abs().max().item()
    lines.append(check_line(name, "neg_v_without_o", diff, diff > TOL,
                            "V rows of head 0 reversed, O columns not: must change the logits"))


def check_line(name, check, diff, ok, note=""):
    return f"{name}\t{check}\t{diff:.3e}\t{'PASS' if ok else 'FAIL'}\t{note}"


def main():
    torch.set_grad_enabled(False)
    lines = []
    work = tempfile.mkdtemp(prefix="mf-tx-")
    for name, _, _ in gen.families():
        src = os.path.join(HERE, name)
        io = load_file(os.path.join(src, "io.safetensors"))
        orig = load_file(os.path.join(src, "model.safetensors"))
        heads, d, _ = heads_of(name)
        base = (logits_of(name, src, io) - io["logits"]).abs().max().item()
        lines.append(check_line(name, "original", base, base < TOL, "committed logits reproduced"))
        for seed in (1, 2, 3):
            out = os.path.join(work, f"{name}-seed{seed}")
            run(["permute", src, "--seed", str(seed), "-o", out])
            perm = load_file(os.path.join(out, "model.safetensors"))
            diff = (logits_of(name, out, io) - io["logits"]).abs().max().item()
            mh, md = q_rows_moved(orig, perm, heads, d)
            changed = sum(not torch.equal(orig[k], perm[k]) for k in orig)
            ok = diff < TOL and changed > 0 and mh > 0
            lines.append(check_line(name, f"permute_seed{seed}", diff, ok,
                                    f"{changed}/{len(orig)} tensors changed, {mh} heads moved, "
                                    f"{md} Q rows moved within their head"))
            if seed == 1:
                aligned = os.path.join(work, f"{name}-aligned")
                run(["align", src, out, "-o", aligned, "--no-progress"])
                back = load_file(os.path.join(aligned, "model.safetensors"))
                err = max((back[k] - orig[k]).abs().max().item() for k in orig)
                lines.append(check_line(name, "undo", err, err == 0.0,
                                        "align(original, permuted) gives the original back"))
    negative_controls(lines, work)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    with open(os.path.join(HERE, "check_torch.txt"), "w") as f:
        f.write(text)
    sys.exit(0 if all("\tPASS\t" in l for l in lines) else 1)


if __name__ == "__main__":
    main()
