#!/usr/bin/env python3
"""Weight matching (Git Re-Basin coordinate descent) in plain numpy + scipy, timed against
modelfusion's `WeightMatching` on the same random weights.

Usage (from the crate root):
    /work/venv/bin/python benches/compare/align_compare.py resnet20x16 [--f64] [--max-iter N] [--keep DIR]

Runs `cargo run --release --example wm_timing -- ARCH --dump DIR` (Rust timing, and the
weights, spec, per-sweep group order and result written to DIR), then the numpy loop
below on the dumped weights, visiting the groups in the same order for the same number
of sweeps, and prints both times, the ratio, and whether the permutations agree.

The numpy loop is written from the algorithm description (REFERENCES.md): for group p,
C = sum over (param, axis) in p of A[param] unfolded on axis times (B[param] with every
other permuted axis reordered by its current permutation, unfolded on axis)^T; solve
scipy.optimize.linear_sum_assignment(C, maximize=True); accept; a sweep with no gain
> 1e-12 ends the run; the objective sum <A, pi(B)> is computed after every sweep (as the
Rust code does).
"""
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
from scipy.optimize import linear_sum_assignment


def load(dump):
    groups = defaultdict(list)
    param_axes = defaultdict(list)
    with open(os.path.join(dump, "spec.tsv")) as f:
        for line in f:
            g, p, ax = line.rstrip("\n").split("\t")
            groups[g].append((p, int(ax)))
            param_axes[p].append((int(ax), g))
    with open(os.path.join(dump, "order.txt")) as f:
        orders = [line.split() for line in f if line.strip()]
    rust = {}
    with open(os.path.join(dump, "perms.tsv")) as f:
        for line in f:
            g, idx = line.rstrip("\n").split("\t")
            rust[g] = np.array([int(i) for i in idx.split()])
    a, b = {}, {}
    for sub, d in (("a", a), ("b", b)):
        for name in os.listdir(os.path.join(dump, sub)):
            d[name[: -len(".npy")]] = np.load(os.path.join(dump, sub, name))
    return groups, param_axes, orders, rust, a, b


def permuted(b, param_axes, name, perms, except_axis):
    w = b[name]
    for ax, g in param_axes.get(name, []):
        if ax != except_axis:
            w = np.take(w, perms[g], axis=ax)
    return w


def objective(a, b, param_axes, perms):
    total = 0.0
    for name in a:
        pb = permuted(b, param_axes, name, perms, None)
        total += float(np.vdot(a[name].astype(np.float64), pb.astype(np.float64)))
    return total


def weight_matching(a, b, groups, param_axes, orders):
    sizes = {g: a[m[0][0]].shape[m[0][1]] for g, m in groups.items()}
    perms = {g: np.arange(n) for g, n in sizes.items()}
    objs = [objective(a, b, param_axes, perms)]
    sweeps = 0
    for order in orders:
        sweeps += 1
        progress = False
        for g in order:
            n = sizes[g]
            c = np.zeros((n, n))
            for name, ax in groups[g]:
                wa = np.moveaxis(a[name], ax, 0).reshape(n, -1)
                wb = np.moveaxis(permuted(b, param_axes, name, perms, ax), ax, 0).reshape(n, -1)
                c += wa @ wb.T
            _, ci = linear_sum_assignment(c, maximize=True)
            rows = np.arange(n)
            if c[rows, ci].sum() > c[rows, perms[g]].sum() + 1e-12:
                progress = True
            perms[g] = ci
        objs.append(objective(a, b, param_axes, perms))
        if not progress:
            break
    return perms, objs, sweeps


def main():
    args = sys.argv[1:]
    if not args:
        print(__doc__)
        sys.exit(2)
    arch = args[0]
    f64 = "--f64" in args
    keep = args[args.index("--keep") + 1] if "--keep" in args else None
    dump = keep or tempfile.mkdtemp(prefix="wm-compare-")
    cmd = ["cargo", "run", "--release", "--quiet", "--example", "wm_timing", "--", arch, "--dump", dump]
    if f64:
        cmd.append("--f64")
    if "--max-iter" in args:
        cmd += ["--max-iter", args[args.index("--max-iter") + 1]]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    print(out.strip())
    m = re.search(r"rust: ([0-9.]+) s, (\d+) sweeps", out)
    rust_time, rust_sweeps = float(m.group(1)), int(m.group(2))

    groups, param_axes, orders, rust_perms, a, b = load(dump)
    t0 = time.perf_counter()
    perms, objs, sweeps = weight_matching(a, b, groups, param_axes, orders)
    py_time = time.perf_counter() - t0
    agree = all(np.array_equal(perms[g], rust_perms[g]) for g in perms)
    print(
        f"numpy+scipy: {py_time:.4f} s, {sweeps} sweeps ({py_time / sweeps:.4f} s/sweep), "
        f"objective {objs[0]:.4f} -> {objs[-1]:.4f}"
    )
    print(f"permutations agree with Rust: {agree}")
    print(
        f"{arch} ({'f64' if f64 else 'f32'}): rust {rust_time:.4f} s ({rust_sweeps} sweeps), "
        f"numpy+scipy {py_time:.4f} s ({sweeps} sweeps), ratio {py_time / rust_time:.1f}x, "
        f"per sweep {(py_time / sweeps) / (rust_time / rust_sweeps):.1f}x"
    )
    if not keep:
        import shutil

        shutil.rmtree(dump, ignore_errors=True)


if __name__ == "__main__":
    main()
