#!/usr/bin/env python3
"""Weight matching (Git Re-Basin coordinate descent): modelfusion's `WeightMatching`
timed against the authors' reference implementation and against this crate's own plain
numpy + scipy loop, on the same random weights, spec and group order.

Usage (from the crate root):

    G=path/to/git-re-basin.git   # a (bare) clone of github.com/samuela/git-re-basin
    mkdir -p /tmp/rebasin/src
    git --git-dir=$G show HEAD:src/weight_matching.py > /tmp/rebasin/src/weight_matching.py
    git --git-dir=$G show HEAD:src/utils.py           > /tmp/rebasin/src/utils.py
    venv/bin/python benches/compare/align_compare.py ARCH [--reference /tmp/rebasin/src]
        [--no-numpy] [--runs N] [--f64] [--max-iter N] [--keep DIR]

ARCH is one of wm_timing's architectures (resnet20x1, resnet20x4, resnet20x16, vgg16,
mlp). The script runs `cargo run --release --example wm_timing -- ARCH --dump DIR`
(Rust timing, best of --runs; the weights, spec, passive parameters, per-sweep group
order and result are written to DIR), then on the dumped weights:

- with --reference: the authors' `weight_matching` (samuela/git-re-basin,
  src/weight_matching.py, JAX + scipy; imported from the given directory, never copied
  into this repository) with `permutation_spec_from_axes_to_perm` over the same spec.
  Its group order is drawn from `jax.random.permutation(rngmix(rng, iteration), ...)`;
  the script replaces those two names in the imported module only, so that sweep `i`
  visits the groups in the order Rust visited them in its sweep `i`. Everything else
  (cost matrices, `linear_sum_assignment`, stopping rule) is the reference's own code.
  Timed best of --runs (the first run includes JAX's per-shape compilation).
- unless --no-numpy: this crate's plain numpy + scipy loop below (written from the
  algorithm description; about 5x slower than the reference, kept as a labelled
  baseline), visiting the groups in the same order.

Passive parameters (BatchNorm running statistics) are left out of the cost matrices and
the objective on every side, as in modelfusion and the reference (whose spec has none).
The objective sum <A, pi(B)> of every side's result is computed here in float64 and the
permutations are compared with Rust's.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
from scipy.optimize import linear_sum_assignment

HERE = os.path.dirname(os.path.abspath(__file__))


def load(dump):
    passive = set()
    path = os.path.join(dump, "passive.txt")
    if os.path.exists(path):
        with open(path) as f:
            passive = {line.strip() for line in f if line.strip()}
    groups = defaultdict(list)
    param_axes = defaultdict(list)
    with open(os.path.join(dump, "spec.tsv")) as f:
        for line in f:
            g, p, ax = line.rstrip("\n").split("\t")
            if p in passive:
                continue
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
            name = name[: -len(".npy")]
            if name not in passive:
                d[name] = np.load(os.path.join(dump, sub, name + ".npy"))
    return groups, param_axes, orders, rust, a, b


def permuted(b, param_axes, name, perms, except_axis):
    w = b[name]
    for ax, g in param_axes.get(name, []):
        if ax != except_axis:
            w = np.take(w, perms[g], axis=ax)
    return w


def objective(a, b, param_axes, perms):
    """sum over matched (non-passive) parameters of <A, pi(B)>, float64."""
    total = 0.0
    for name in a:
        pb = permuted(b, param_axes, name, perms, None)
        total += float(np.vdot(a[name].astype(np.float64), pb.astype(np.float64)))
    return total


def numpy_weight_matching(a, b, groups, param_axes, orders):
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


class FixedOrder:
    """Stands in for `jax.random` in the reference module: `permutation(key, n)` returns
    the indices of Rust's group order for sweep `key` (the script's `rngmix` returns the
    sweep index itself) and records how many sweeps were run."""

    def __init__(self, orders, names):
        self.idx = [[names.index(g) for g in order] for order in orders]
        self.sweeps = 0

    def permutation(self, key, n):
        it = int(key)
        if it >= len(self.idx) or len(self.idx[it]) != n:
            raise RuntimeError(f"no Rust group order for sweep {it} over {n} groups")
        self.sweeps = max(self.sweeps, it + 1)
        return self.idx[it]


def reference_weight_matching(wm, a, b, groups, orders, runs):
    import jax.numpy as jnp
    from jax import random

    a2p = {}
    for g, members in groups.items():
        for name, ax in members:
            a2p.setdefault(name, [None] * a[name].ndim)[ax] = g
    ps = wm.permutation_spec_from_axes_to_perm({k: tuple(v) for k, v in a2p.items()})
    pa = {k: jnp.asarray(a[k]) for k in a2p}
    pb = {k: jnp.asarray(b[k]) for k in a2p}
    names = list(ps.perm_to_axes.keys())
    saved = wm.random, wm.rngmix
    best, perm, sweeps = float("inf"), None, 0
    try:
        for _ in range(runs):
            order = FixedOrder(orders, names)
            wm.random, wm.rngmix = order, (lambda rng, it: it)
            t0 = time.perf_counter()
            perm = wm.weight_matching(random.PRNGKey(0), ps, pa, pb, max_iter=len(orders), silent=True)
            perm = {g: np.asarray(p) for g, p in perm.items()}
            best = min(best, time.perf_counter() - t0)
            sweeps = order.sweeps
    finally:
        wm.random, wm.rngmix = saved
    return perm, sweeps, best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("arch")
    ap.add_argument("--reference", metavar="SRC",
                    help="directory holding the reference's weight_matching.py and utils.py")
    ap.add_argument("--no-numpy", action="store_true", help="skip the crate's numpy + scipy loop")
    ap.add_argument("--runs", type=int, default=1, help="best of N for Rust and the reference")
    ap.add_argument("--f64", action="store_true")
    ap.add_argument("--max-iter", type=int)
    ap.add_argument("--keep", metavar="DIR")
    args = ap.parse_args()
    dump = args.keep or tempfile.mkdtemp(prefix="wm-compare-")
    cmd = ["cargo", "run", "--release", "--quiet", "--example", "wm_timing", "--", args.arch,
           "--dump", dump, "--runs", str(args.runs)]
    if args.f64:
        cmd.append("--f64")
    if args.max_iter:
        cmd += ["--max-iter", str(args.max_iter)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    print(out.strip())
    m = re.search(r"rust: ([0-9.]+) s \(best of \d+\), (\d+) sweeps", out)
    rust_time, rust_sweeps = float(m.group(1)), int(m.group(2))

    groups, param_axes, orders, rust_perms, a, b = load(dump)
    rust_obj = objective(a, b, param_axes, rust_perms)
    print(f"rust objective (float64, recomputed here): {rust_obj:.9f}")
    label = f"{args.arch} ({'f64' if args.f64 else 'f32'})"
    if args.reference:
        sys.path.insert(0, HERE)
        from rebasin_objective import import_reference

        wm = import_reference(args.reference)
        perms, sweeps, ref_time = reference_weight_matching(wm, a, b, groups, orders, args.runs)
        obj = objective(a, b, param_axes, perms)
        agree = all(np.array_equal(perms[g], rust_perms[g]) for g in rust_perms)
        print(f"reference: {ref_time:.4f} s (best of {args.runs}), {sweeps} sweeps, objective {obj:.9f} "
              f"(rel. diff. to rust {(obj - rust_obj) / abs(rust_obj):+.1e}), permutations agree: {agree}")
        print(f"{label}: rust {rust_time:.4f} s ({rust_sweeps} sweeps), reference {ref_time:.4f} s "
              f"({sweeps} sweeps), reference / rust {ref_time / rust_time:.1f}x")
    if not args.no_numpy:
        t0 = time.perf_counter()
        perms, objs, sweeps = numpy_weight_matching(a, b, groups, param_axes, orders)
        py_time = time.perf_counter() - t0
        agree = all(np.array_equal(perms[g], rust_perms[g]) for g in rust_perms)
        print(f"crate's numpy+scipy loop: {py_time:.4f} s, {sweeps} sweeps, objective {objs[-1]:.9f}, "
              f"permutations agree: {agree}")
        print(f"{label}: rust {rust_time:.4f} s ({rust_sweeps} sweeps), numpy loop {py_time:.4f} s "
              f"({sweeps} sweeps), numpy loop / rust {py_time / rust_time:.1f}x")
    if not args.keep:
        import shutil

        shutil.rmtree(dump, ignore_errors=True)


if __name__ == "__main__":
    main()
