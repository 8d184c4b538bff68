#!/usr/bin/env python3
"""Does modelfusion's weight matching reach the Git Re-Basin reference's weights-only
objective on a CIFAR ResNet-20 with BatchNorm?

Usage (from the crate root, after `cargo build --release --features cli`):

    G=/path/to/git-re-basin.git   # a (bare) clone of github.com/samuela/git-re-basin
    mkdir -p /tmp/rebasin/src
    git --git-dir=$G show HEAD:src/weight_matching.py > /tmp/rebasin/src/weight_matching.py
    git --git-dir=$G show HEAD:src/utils.py           > /tmp/rebasin/src/utils.py
    venv/bin/python benches/compare/rebasin_objective.py /tmp/rebasin/src \
        [--width 4] [--seeds 5] [--out benches/compare/rebasin_objective.txt] [--keep DIR]

Needs torch, safetensors, numpy, scipy and jax (CPU is enough). The reference code is
imported from the directory given as first argument and is never copied into this repo.
Its `utils.py` imports flax and `jax.tree_map` at module level although `rngmix` (the only
thing `weight_matching.py` takes from it) needs neither; if that import fails, inert
stand-ins for those names are put in place before importing (nothing of them is called).

What it does:
  1. Two random-init CIFAR ResNet-20 (kuangliu / REPAIR naming: conv1, bn1,
     layer{1,2,3}.{b}.conv1/bn1/conv2/bn2, layer{2,3}.0.shortcut.0/.1, linear), width
     multiplier --width, BatchNorm with random affine parameters and random running
     statistics (running_mean ~ N(0,1), running_var ~ U[0.5, 50]: large enough that putting
     them in the cost would change the matching), saved as A/model.safetensors and
     B/model.safetensors (PyTorch state-dict layout, int64 num_batches_tracked).
  2. `modelfusion spec A --write A.spec.json`, then `modelfusion align A B -o OUT --seed S`
     for S in 0..seeds; the permutations are recovered from OUT/model.safetensors (the
     1-D BatchNorm vectors of each group are unique) and checked to reproduce every
     tensor of OUT exactly.
  3. The reference `weight_matching(PRNGKey(S), ps, A, B)` (max_iter=100) with `ps` built
     from the same JSON spec by `permutation_spec_from_axes_to_perm` over the PyTorch
     names (layout-agnostic: conv weight axes (out, in, kh, kw)), once WITHOUT the running
     statistics (weights only, what the reference objective is: its ResNet-20 has
     LayerNorm) and once WITH running_mean/running_var in their groups (the old
     behaviour).
  4. The reference started from each modelfusion result (init_perm): does its coordinate
     descent find any gain (is modelfusion's result one of its fixed points)?
  5. For every result, the weights-only objective sum over float parameters other than
     running_mean/running_var/num_batches_tracked of <A, pi(B)> (float64 numpy, this
     script's own code), the sweeps, and the agreement with the best weights-only
     reference run (fraction of units of a group mapped to the same unit, averaged over
     groups). Prints the table and writes it to --out.
"""
import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def is_running(name):
    return name.rsplit(".", 1)[-1] in RUNNING


# ---------------------------------------------------------------- models (PyTorch)

def make_resnet20(width, seed):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

    class ResNet20(nn.Module):
        def __init__(self, w):
            super().__init__()
            c = [16 * w, 32 * w, 64 * w]
            self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c[0])
            cin = c[0]
            for s, (cout, stride) in enumerate(zip(c, (1, 2, 2)), start=1):
                blocks = []
                for b in range(3):
                    blocks.append(Block(cin, cout, stride if b == 0 else 1))
                    cin = cout
                setattr(self, f"layer{s}", nn.Sequential(*blocks))
            self.linear = nn.Linear(c[2], 10)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))

    torch.manual_seed(seed)
    m = ResNet20(width)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                mod.bias.copy_(0.1 * torch.randn(n, generator=g))
                mod.running_mean.copy_(torch.randn(n, generator=g))
                mod.running_var.copy_(0.5 + 49.5 * torch.rand(n, generator=g))
                mod.num_batches_tracked.fill_(int(torch.randint(1, 10000, (1,), generator=g)))
    m.eval()
    m(torch.randn(2, 3, 32, 32))  # it runs
    return {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}


def save(sd, d):
    from safetensors.torch import save_file
    os.makedirs(d, exist_ok=True)
    save_file(sd, os.path.join(d, "model.safetensors"))


def load_np(d):
    from safetensors.numpy import load_file
    return load_file(os.path.join(d, "model.safetensors"))


# ---------------------------------------------------------------- spec

def read_spec(path):
    """JSON spec -> {group: [(param, axis)]}, passive set, invariant set."""
    with open(path) as f:
        spec = json.load(f)
    assert spec["modelfusion_spec"] == 1, spec.get("modelfusion_spec")
    groups, passive, invariant = {}, set(), set()
    for rule in spec["rules"]:
        assert "for" not in rule, "spec written by `modelfusion spec --write` is explicit"
        if "group" in rule:
            for e in rule.get("params", []):
                assert e.get("repeat", 1) == 1, e
                groups.setdefault(rule["group"], []).append((e["param"], int(e["axis"])))
            extra = set(rule) - {"group", "params", "invariant", "passive"}
            assert not extra, f"unexpected members {extra} in an explicit rule"
        passive.update(rule.get("passive", []))
        invariant.update(rule.get("invariant", []))
        assert not rule.get("tied"), "no tied parameters expected in ResNet-20"
    return groups, passive, invariant


def axes_to_perm(groups, shapes, include_running):
    """Reference-style axes_to_perm over PyTorch names: every float param gets a tuple of
    length ndim (None where no group acts); running stats only if include_running."""
    a2p = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            continue
        if is_running(name) and not include_running:
            continue
        a2p[name] = [None] * len(shape)
    for g, members in groups.items():
        for param, axis in members:
            if param in a2p:
                assert a2p[param][axis] is None, (param, axis)
                a2p[param][axis] = g
    return {k: tuple(v) for k, v in a2p.items()}


# ---------------------------------------------------------------- objective etc.

def param_axes(groups):
    pa = {}
    for g, members in groups.items():
        for param, axis in members:
            pa.setdefault(param, []).append((axis, g))
    return pa


def apply_perms(b, pa, perms):
    out = {}
    for k, w in b.items():
        for axis, g in pa.get(k, []):
            w = np.take(w, perms[g], axis=axis)
        out[k] = w
    return out


def weights_objective(a, pb):
    """sum over float non-running-stat params of <A, pi(B)>, float64."""
    return float(sum(np.vdot(a[k].astype(np.float64), pb[k].astype(np.float64))
                     for k in a if not is_running(k) and a[k].dtype.kind == "f"))


def recover_perms(b, aligned, groups):
    """Permutation of each group from the 1-D vectors (BN weight, bias, running stats) of
    the group: aligned[v][i] == b[v][perm[i]]."""
    perms = {}
    for g, members in groups.items():
        vecs = [p for p, ax in members if b[p].ndim == 1]
        assert vecs, f"group {g} has no 1-D member to read its permutation from"
        kb = {tuple(b[v][j] for v in vecs): j for j in range(len(b[vecs[0]]))}
        assert len(kb) == len(b[vecs[0]]), f"group {g}: 1-D members not unique"
        perms[g] = np.array([kb[tuple(aligned[v][i] for v in vecs)]
                             for i in range(len(aligned[vecs[0]]))])
    return perms


def agreement(p, q):
    return float(np.mean([np.mean(p[g] == q[g]) for g in q]))


# ---------------------------------------------------------------- reference

def import_reference(src):
    sys.path.insert(0, os.path.abspath(src))
    try:
        import utils  # noqa: F401
    except ImportError as e:
        print(f"note: reference utils.py does not import as is ({e}); "
              "putting inert stand-ins for flax / jax.tree_map in place", file=sys.stderr)
        import jax
        import jax.tree_util
        if not hasattr(jax, "tree_map"):
            jax.tree_map = jax.tree_util.tree_map
        if "flax" not in sys.modules:
            try:
                import flax  # noqa: F401
            except ImportError:
                flax = types.ModuleType("flax")
                tu = types.ModuleType("flax.traverse_util")
                core = types.ModuleType("flax.core")
                core.freeze = core.unfreeze = lambda x: x
                tu.flatten_dict = tu.unflatten_dict = lambda *a, **k: None
                flax.traverse_util, flax.core = tu, core
                sys.modules.update({"flax": flax, "flax.traverse_util": tu, "flax.core": core})
        sys.modules.pop("utils", None)
        import utils  # noqa: F401
    import weight_matching as wm
    return wm


def run_reference(wm, a2p, a, b, seed, init=None):
    import jax.numpy as jnp
    from jax import random
    ps = wm.permutation_spec_from_axes_to_perm(a2p)
    pa = {k: jnp.asarray(a[k]) for k in a2p}
    pb = {k: jnp.asarray(b[k]) for k in a2p}
    buf = io.StringIO()
    t = time.time()
    with contextlib.redirect_stdout(buf):
        perm = wm.weight_matching(random.PRNGKey(seed), ps, pa, pb, max_iter=100,
                                  init_perm=None if init is None else
                                  {g: jnp.asarray(p) for g, p in init.items()},
                                  silent=False)
    dt = time.time() - t
    its = [int(m.group(1)) for m in re.finditer(r"^(\d+)/", buf.getvalue(), re.M)]
    return {g: np.asarray(p) for g, p in perm.items()}, max(its) + 1, dt


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ref_src", help="directory holding the reference's weight_matching.py and utils.py")
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default="benches/compare/rebasin_objective.txt")
    ap.add_argument("--keep", help="keep the models and outputs in this directory")
    args = ap.parse_args()
    binary = os.environ.get("MODELFUSION_BIN", "target/release/modelfusion")
    wm = import_reference(args.ref_src)
    import jax
    tmp = args.keep or tempfile.mkdtemp(prefix="rebasin_obj_")
    os.makedirs(tmp, exist_ok=True)

    A, B = os.path.join(tmp, "A"), os.path.join(tmp, "B")
    save(make_resnet20(args.width, 1), A)
    save(make_resnet20(args.width, 2), B)
    a, b = load_np(A), load_np(B)
    nparams = sum(v.size for k, v in a.items() if not is_running(k))

    spec_path = os.path.join(tmp, "A.spec.json")
    subprocess.run([binary, "spec", A, "--write", spec_path], check=True,
                   stdout=subprocess.DEVNULL)
    groups, passive, invariant = read_spec(spec_path)
    running = {k for k in a if k.rsplit(".", 1)[-1] in ("running_mean", "running_var")}
    assert running <= passive, f"running stats not passive in the spec: {sorted(running - passive)[:3]}"
    pa = param_axes(groups)
    shapes = {k: v.shape for k, v in a.items()}

    rows = []  # (method, seed, objective, sweeps, perms, seconds)
    ident = {g: np.arange(a[m[0][0]].shape[m[0][1]]) for g, m in groups.items()}
    rows.append(("identity (B as is)", "-", weights_objective(a, b), "-", ident, 0.0))

    for s in range(args.seeds):
        out = os.path.join(tmp, f"OUT{s}")
        t = time.time()
        r = subprocess.run([binary, "align", A, B, "-o", out, "--seed", str(s), "--no-progress"],
                           check=True, capture_output=True, text=True)
        dt = time.time() - t
        m = re.search(r"(\d+) sweep\(s\)", r.stderr)
        al = load_np(out)
        perms = recover_perms(b, al, groups)
        re_b = apply_perms(b, pa, perms)
        for k in al:
            assert np.array_equal(re_b[k], al[k]), f"recovered permutation does not give {k}"
        obj = weights_objective(a, al)
        rows.append(("modelfusion align", s, obj, m.group(1) if m else "?", perms, dt))
        print(f"modelfusion seed {s}: {obj:.6f}  ({r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''})",
              file=sys.stderr)

    for include in (False, True):
        a2p = axes_to_perm(groups, shapes, include)
        label = "reference, weights only" if not include else "reference, + running stats"
        for s in range(args.seeds):
            perms, sweeps, dt = run_reference(wm, a2p, a, b, s)
            assert set(perms) == set(groups)
            obj = weights_objective(a, apply_perms(b, pa, perms))
            rows.append((label, s, obj, str(sweeps), perms, dt))
            print(f"{label} seed {s}: {obj:.6f}", file=sys.stderr)

    # Is modelfusion's result a fixed point of the reference's coordinate descent?
    a2p = axes_to_perm(groups, shapes, False)
    for row in [r for r in rows if r[0] == "modelfusion align"]:
        perms, sweeps, dt = run_reference(wm, a2p, a, b, row[1], init=row[4])
        obj = weights_objective(a, apply_perms(b, pa, perms))
        moved = agreement(perms, row[4])
        rows.append(("ref. from modelfusion result", row[1], obj, str(sweeps), perms, dt))
        print(f"reference from modelfusion seed {row[1]}: {obj:.6f} ({sweeps} sweep(s), "
              f"{moved:.3f} of units unchanged)", file=sys.stderr)

    ref_rows = [r for r in rows if r[0] == "reference, weights only"]
    best = max(ref_rows, key=lambda r: r[2])
    base = rows[0][2]

    lines = []
    lines.append(f"Weights-only weight-matching objective, CIFAR ResNet-20 (width {args.width}, BatchNorm, "
                 f"kuangliu/REPAIR names), two random inits")
    lines.append(f"BN running_var ~ U[0.5, 50], running_mean ~ N(0,1); {len(groups)} groups, "
                 f"{nparams} non-running-stat parameters")
    lines.append("objective = sum over float params except running_mean/running_var/num_batches_tracked of <A, pi(B)>")
    lines.append(f"reference: samuela/git-re-basin src/weight_matching.py (jax {jax.__version__}, CPU), "
                 "spec built from `modelfusion spec --write`; agreement = mean over groups of the "
                 f"fraction of units mapped as in the best weights-only reference run (seed {best[1]})")
    lines.append("")
    hdr = f"{'method':<28} {'seed':>4} {'objective':>14} {'gain vs id':>11} {'rel. to best ref':>16} {'sweeps':>6} {'agree':>6} {'time s':>7}"
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for meth, seed, obj, sweeps, perms, dt in rows:
        rel = (obj - best[2]) / abs(best[2])
        lines.append(f"{meth:<28} {seed!s:>4} {obj:>14.6f} {obj - base:>11.6f} {rel:>+16.2e} {sweeps!s:>6} "
                     f"{agreement(perms, best[4]):>6.3f} {dt:>7.2f}")
    lines.append("")
    for meth in ("modelfusion align", "reference, weights only", "reference, + running stats",
                 "ref. from modelfusion result"):
        objs = np.array([r[2] for r in rows if r[0] == meth])
        lines.append(f"{meth:<28} objective mean {objs.mean():.6f}  min {objs.min():.6f}  max {objs.max():.6f}  "
                     f"gain over identity mean {objs.mean() - base:.6f}")
    mf = np.array([r[2] for r in rows if r[0] == "modelfusion align"])
    rw = np.array([r[2] for r in ref_rows])
    lines.append(f"best modelfusion vs best reference (weights only): relative difference "
                 f"{(mf.max() - rw.max()) / abs(rw.max()):+.3e}; mean vs mean {(mf.mean() - rw.mean()) / abs(rw.mean()):+.3e}; "
                 f"in gain over identity: best {(mf.max() - base) / (rw.max() - base) - 1:+.3e}, "
                 f"mean {(mf.mean() - base) / (rw.mean() - base) - 1:+.3e}")
    fp = [(r, m) for r in rows if r[0] == "ref. from modelfusion result"
          for m in rows if m[0] == "modelfusion align" and m[1] == r[1]]
    lines.append("reference weight_matching started from modelfusion's permutations (init_perm): "
                 + "; ".join(f"seed {m[1]}: {r[3]} sweep(s), objective change {r[2] - m[2]:+.2e}, "
                             f"units unchanged {agreement(r[4], m[4]):.3f}" for r, m in fp))
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
