#!/usr/bin/env python3
"""PyTorch-side check of `modelfusion spec / permute / align` on the gen.py checkpoints.

For every model NAME written by gen.py into DATA (default /tmp/mf-golden-specs):

  spec         `modelfusion spec DATA/NAME` exits 0 (its family line is recorded)
  spec_family  its output names the family of tables/NAME.json
  permute      `modelfusion permute DATA/NAME --seed 1 -o T/permuted`: same names, dtypes and
               shapes; loads with load_state_dict(strict=True); logits on the fixed input equal
               the original's (max abs diff < 1e-4, f32)
  perm_changed the number of tensors the permutation changed: must be > 0 and equal to the number
               of tensors this script's own permutation spec (the oracle below) says are permutable
  undo         `modelfusion align DATA/NAME T/permuted -o T/aligned`: every tensor bit-identical
               to the original, dtype included (int64 num_batches_tracked too)
  align_b      `modelfusion align DATA/NAME DATA/NAME_b -o T/b_aligned`: names/dtypes/shapes of B,
               aligned B computes B's function (logits max abs diff < 1e-4), and every non-float
               tensor is bit-identical to B's. The note gives ||A-B|| -> ||A-aligned B|| (info).

One line per model and check (name, check, max abs diff, PASS/FAIL, note) is printed and written to
tests/golden/specs/torch_check.txt; the exit status is 1 on any failure, 2 if the CLI (or the
data) is missing.

--self-test runs the same checks with the CLI replaced by a pure-PyTorch permutation built from
this script's own spec oracle (permute = random permutation of every group, undo = the inverse
permutation, align_b = a random permutation of B), plus negative controls (a permutation applied
to producers but not consumers must change the logits; a one-bit change must fail the bit-exact
comparison). It needs no binary, and writes tests/golden/specs/torch_selftest.txt.

Run (from the repository root):
    venv/bin/python tests/golden/specs/gen.py                  # data
    venv/bin/python tests/golden/specs/check_torch.py --self-test
    cargo build --release --features cli
    venv/bin/python tests/golden/specs/check_torch.py          # uses $MODELFUSION_BIN,
                                                 # default target/release/modelfusion
Options: --data DIR, --work DIR, --models a,b,c, --tol 1e-4.
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections import OrderedDict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, HERE)
import gen  # noqa: E402

from safetensors.torch import load_file, save_file  # noqa: E402

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- checkpoints

def ckpt_file(path):
    """The safetensors file(s) of a checkpoint path (file, or directory with model.safetensors)."""
    if os.path.isfile(path):
        return [path]
    p = os.path.join(path, "model.safetensors")
    if os.path.isfile(p):
        return [p]
    files = sorted(f for f in glob.glob(os.path.join(path, "*.safetensors"))
                   if not f.endswith("io.safetensors"))
    if not files:
        raise FileNotFoundError("no .safetensors checkpoint at %s" % path)
    return files


def load_ckpt(path):
    sd = {}
    for f in ckpt_file(path):
        sd.update(load_file(f))
    return sd


def save_ckpt(sd, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out_dir, "model.safetensors"))


def bits(t):
    """A view of t's bytes as an integer tensor (bit-exact comparison, -0.0 != 0.0)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a, b):
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and torch.equal(bits(a), bits(b))


def layout_diff(ref, got):
    """'' if got has exactly ref's names, dtypes and shapes, else a short description."""
    if set(ref) != set(got):
        miss, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
        return "names differ: missing %s extra %s" % (miss[:3], extra[:3])
    for k in ref:
        if ref[k].dtype != got[k].dtype:
            return "%s dtype %s != %s" % (k, got[k].dtype, ref[k].dtype)
        if tuple(ref[k].shape) != tuple(got[k].shape):
            return "%s shape %s != %s" % (k, tuple(got[k].shape), tuple(ref[k].shape))
    return ""


# ----------------------------------------------------------------------------- oracle spec
# A group: (name, size, [(tensor, axis, block)]); `block` > 1 when an axis holds size*block
# entries with the group's index as the major part (conv -> flatten -> linear: C*7*7).

class Spec:
    def __init__(self, sd):
        self.sd = sd
        self.groups = []

    def group(self, name, size):
        g = (name, size, [])
        self.groups.append(g)
        return g

    def out(self, g, layer, bn=None):
        g[2].append((layer + ".weight", 0, 1))
        if layer + ".bias" in self.sd:
            g[2].append((layer + ".bias", 0, 1))
        if bn is not None:
            for s in ("weight", "bias", "running_mean", "running_var"):
                if bn + "." + s in self.sd:
                    g[2].append((bn + "." + s, 0, 1))

    def inp(self, g, layer):
        n = self.sd[layer + ".weight"].shape[1]
        assert n % g[1] == 0, (layer, n, g[1])
        g[2].append((layer + ".weight", 1, n // g[1]))

    def permutable(self):
        return sorted({m[0] for g in self.groups for m in g[2]})


def prefixes(sd):
    seen = OrderedDict()
    for k in sd:
        seen.setdefault(k.rsplit(".", 1)[0], None)
    return list(seen)


def chain_spec(sd):
    """MLPs and VGG: weight layers in module order, each optionally followed by a BatchNorm."""
    sp = Spec(sd)
    items = []  # [layer, bn]
    for p in prefixes(sd):
        if p + ".running_mean" in sd:
            items[-1][1] = p
        elif sd[p + ".weight"].dim() >= 2:
            items.append([p, None])
    for i, (layer, bn) in enumerate(items[:-1]):
        g = sp.group("P_%s" % layer, sd[layer + ".weight"].shape[0])
        sp.out(g, layer, bn)
        sp.inp(g, items[i + 1][0])
    return sp


def resnet_spec(sd):
    """torchvision ResNet (BasicBlock/Bottleneck, downsample) and CIFAR ResNet (shortcut)."""
    sp = Spec(sd)
    head = "fc" if "fc.weight" in sd else "linear"
    res = sp.group("P_stem", sd["conv1.weight"].shape[0])
    sp.out(res, "conv1", "bn1")
    blocks = sorted({(int(k.split(".")[0][5:]), int(k.split(".")[1]))
                     for k in sd if k.startswith("layer")})
    for s, b in blocks:
        p = "layer%d.%d" % (s, b)
        nconv = max(int(k[len(p) + 5:].split(".")[0]) for k in sd if k.startswith(p + ".conv"))
        sp.inp(res, p + ".conv1")
        proj = next((p + "." + n for n in ("downsample", "shortcut") if p + "." + n + ".0.weight" in sd),
                    None)
        if proj is not None:
            sp.inp(res, proj + ".0")
            res = sp.group("P_res_" + p, sd[proj + ".0.weight"].shape[0])
            sp.out(res, proj + ".0", proj + ".1")
        for j in range(1, nconv):
            g = sp.group("P_%s_inner%d" % (p, j), sd["%s.conv%d.weight" % (p, j)].shape[0])
            sp.out(g, "%s.conv%d" % (p, j), "%s.bn%d" % (p, j))
            sp.inp(g, "%s.conv%d" % (p, j + 1))
        sp.out(res, "%s.conv%d" % (p, nconv), "%s.bn%d" % (p, nconv))
    sp.inp(res, head)
    return sp


def oracle_spec(name, sd):
    family = gen.MODELS[name][1]
    # safetensors files sort names; the chain needs module (forward) order
    sd = OrderedDict((k, sd[k]) for k in gen.fresh(name).state_dict())
    return resnet_spec(sd) if family.endswith("resnet") else chain_spec(sd)


def index_for(perm, block):
    if block == 1:
        return perm
    return (perm[:, None] * block + torch.arange(block)[None, :]).reshape(-1)


def apply_perms(sp, sd, perms):
    out = OrderedDict((k, v.clone()) for k, v in sd.items())
    for (gname, _size, members) in sp.groups:
        for (k, axis, block) in members:
            out[k] = out[k].index_select(axis, index_for(perms[gname], block))
    return out


def random_perms(sp, seed):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randperm(size, generator=g) for (name, size, _m) in sp.groups}


def inverse(perms):
    return {k: torch.argsort(p) for k, p in perms.items()}


# ----------------------------------------------------------------------------- checks

class Report:
    def __init__(self):
        self.rows = []

    def add(self, name, check, diff, ok, note=""):
        d = "-" if diff is None else "%.3e" % diff
        row = "%-20s %-12s %-10s %-4s %s" % (name, check, d, "PASS" if ok else "FAIL", note)
        print(row, flush=True)
        self.rows.append((ok, row))

    @property
    def failed(self):
        return sum(1 for ok, _ in self.rows if not ok)

    def write(self, path, header):
        with open(path, "w") as f:
            f.write(header + "\n")
            f.write("%-20s %-12s %-10s %-4s %s\n" % ("model", "check", "maxabsdiff", "ok", "note"))
            for _, row in self.rows:
                f.write(row + "\n")
            f.write("%d passed, %d failed\n" % (len(self.rows) - self.failed, self.failed))


def max_abs(a, b):
    return (a.float() - b.float()).abs().max().item()


def check_function(rep, name, check, ref_sd, got_sd, x, ref_logits, tol):
    """Layout equal to ref's, strict load, logits within tol. Returns the max abs diff or None."""
    why = layout_diff(ref_sd, got_sd)
    if why:
        rep.add(name, check, None, False, why)
        return None
    try:
        model = gen.load_into(name, got_sd)
    except Exception as e:  # noqa: BLE001
        rep.add(name, check, None, False, "load_state_dict(strict=True): %s" % str(e)[:120])
        return None
    d = max_abs(gen.logits(model, x), ref_logits)
    rep.add(name, check, d, d < tol, "logits vs reference, |logits|max %.2f" % ref_logits.abs().max())
    return d


def count_changed(a, b):
    return sum(1 for k in a if not same_bits(a[k], b[k]))


def check_changed(rep, name, orig, permuted, sp):
    n = count_changed(orig, permuted)
    expect = len(sp.permutable())
    ok = n > 0 and n == expect
    rep.add(name, "perm_changed", None, ok,
            "%d/%d tensors changed; oracle: %d permutable in %d groups"
            % (n, len(orig), expect, len(sp.groups)))


def check_bitexact(rep, name, check, ref, got, only_nonfloat=False):
    why = layout_diff(ref, got)
    if why:
        rep.add(name, check, None, False, why)
        return False
    keys = [k for k in ref if not (only_nonfloat and ref[k].dtype in FLOATS)]
    bad = [k for k in keys if not same_bits(ref[k], got[k])]
    fl = [k for k in keys if ref[k].dtype in FLOATS]
    d = max((max_abs(ref[k], got[k]) for k in fl), default=0.0)
    ints = [k for k in keys if ref[k].dtype not in FLOATS]
    note = "%d/%d tensors bit-identical (%d non-float: %s)" % (
        len(keys) - len(bad), len(keys), len(ints),
        ",".join(sorted({str(ref[k].dtype).replace("torch.", "") for k in ints})) or "none")
    if bad:
        note += "; first differing: %s" % bad[0]
    rep.add(name, check, d if fl else None, not bad, note)
    return not bad


def dist(a, b):
    return sum(((a[k].double() - b[k].double()) ** 2).sum().item()
               for k in a if a[k].dtype in FLOATS) ** 0.5


# ----------------------------------------------------------------------------- CLI driver

def run(cmd, timeout=900):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired:
        return 124, "", "timed out after %ds" % timeout


def find_bin():
    b = os.environ.get("MODELFUSION_BIN", os.path.join(REPO, "target", "release", "modelfusion"))
    if not os.path.isabs(b):
        b = os.path.join(REPO, b)
    if not (os.path.isfile(b) and os.access(b, os.X_OK)):
        print("check_torch: no modelfusion binary at %s.\n  Build it with "
              "`cargo build --release --features cli` or set MODELFUSION_BIN.\n"
              "  (--self-test checks the PyTorch side without it.)" % b, file=sys.stderr)
        sys.exit(2)
    # clap exits non-zero on `CMD --help` for an unknown subcommand
    missing = [c for c in ("spec", "permute", "align") if run([b, c, "--help"], timeout=60)[0] != 0]
    if missing:
        print("check_torch: %s has no %s subcommand: the CLI of issue 11 has not landed in this "
              "build (rebuild with --features cli after it does)." % (b, "/".join(missing)),
              file=sys.stderr)
        sys.exit(2)
    return b


def family_line(out):
    for line in out.splitlines():
        if "family" in line.lower():
            return line.strip()
    return out.strip().splitlines()[0].strip() if out.strip() else ""


def cli_model(rep, b, data, work, name, tol):
    a_dir, b_dir = os.path.join(data, name), os.path.join(data, name + "_b")
    A, B = load_ckpt(a_dir), load_ckpt(b_dir)
    x = load_file(os.path.join(a_dir, "io.safetensors"))["input"]
    yA = gen.logits(gen.load_into(name, A), x)
    yB = gen.logits(gen.load_into(name, B), x)
    sp = oracle_spec(name, A)
    family = gen.MODELS[name][1]
    t = os.path.join(work, name)
    shutil.rmtree(t, ignore_errors=True)
    os.makedirs(t)

    rc, out, err = run([b, "spec", a_dir])
    fl = family_line(out)
    rep.add(name, "spec", None, rc == 0, ("rc=%d " % rc) + (fl or err.strip()[-150:]))
    rep.add(name, "spec_family", None, family.lower() in out.lower(),
            "expect '%s' in output" % family)

    perm_dir = os.path.join(t, "permuted")
    rc, out, err = run([b, "permute", a_dir, "--seed", "1", "-o", perm_dir])
    if rc != 0:
        rep.add(name, "permute", None, False, "rc=%d %s" % (rc, err.strip()[-150:]))
    else:
        P = load_ckpt(perm_dir)
        if check_function(rep, name, "permute", A, P, x, yA, tol) is not None:
            check_changed(rep, name, A, P, sp)
        rc, out, err = run([b, "align", a_dir, perm_dir, "-o", os.path.join(t, "aligned")])
        if rc != 0:
            rep.add(name, "undo", None, False, "rc=%d %s" % (rc, err.strip()[-150:]))
        else:
            check_bitexact(rep, name, "undo", A, load_ckpt(os.path.join(t, "aligned")))

    rc, out, err = run([b, "align", a_dir, b_dir, "-o", os.path.join(t, "b_aligned")])
    if rc != 0:
        rep.add(name, "align_b", None, False, "rc=%d %s" % (rc, err.strip()[-150:]))
    else:
        Bal = load_ckpt(os.path.join(t, "b_aligned"))
        if check_function(rep, name, "align_b", B, Bal, x, yB, tol) is not None:
            check_bitexact(rep, name, "align_b_int", B, Bal, only_nonfloat=True)
            rep.add(name, "align_b_dist", None, True,
                    "info: ||A-B|| %.4f -> ||A-aligned B|| %.4f" % (dist(A, B), dist(A, Bal)))


# ----------------------------------------------------------------------------- self-test

def self_model(rep, data, work, name, tol):
    """The CLI checks with pure-PyTorch stand-ins (oracle spec), plus negative controls."""
    a_dir, b_dir = os.path.join(data, name), os.path.join(data, name + "_b")
    A, B = load_ckpt(a_dir), load_ckpt(b_dir)
    io = load_file(os.path.join(a_dir, "io.safetensors"))
    x = io["input"]
    yA = gen.logits(gen.load_into(name, A), x)
    yB = gen.logits(gen.load_into(name, B), x)
    rep.add(name, "io_logits", max_abs(yA, io["logits"]), same_bits(yA, io["logits"]),
            "reloaded model reproduces io.safetensors logits")
    sp = oracle_spec(name, A)
    t = os.path.join(work, name)
    shutil.rmtree(t, ignore_errors=True)

    # permute (stand-in): random permutation of every group, written and read back from disk
    perms = random_perms(sp, 1)
    save_ckpt(apply_perms(sp, A, perms), os.path.join(t, "permuted"))
    P = load_ckpt(os.path.join(t, "permuted"))
    check_function(rep, name, "permute", A, P, x, yA, tol)
    check_changed(rep, name, A, P, sp)
    # undo (stand-in): the inverse permutation
    save_ckpt(apply_perms(sp, P, inverse(perms)), os.path.join(t, "aligned"))
    U = load_ckpt(os.path.join(t, "aligned"))
    check_bitexact(rep, name, "undo", A, U)
    # align_b (stand-in): a random permutation of B
    save_ckpt(apply_perms(sp, B, random_perms(sp, 2)), os.path.join(t, "b_aligned"))
    Bal = load_ckpt(os.path.join(t, "b_aligned"))
    check_function(rep, name, "align_b", B, Bal, x, yB, tol)
    check_bitexact(rep, name, "align_b_int", B, Bal, only_nonfloat=True)

    # negative controls: each must be detected by the checks above
    broken_groups = 0
    for (gname, size, members) in sp.groups:
        producers = [m for m in members if m[1] == 0]
        half = Spec(A)
        half.groups = [(gname, size, producers)]
        Bk = apply_perms(half, A, {gname: perms[gname]})
        d = max_abs(gen.logits(gen.load_into(name, Bk), x), yA)
        broken_groups += d >= tol
    rep.add(name, "neg_perm", None, broken_groups == len(sp.groups),
            "producers-only permutation changes logits (>= tol) for %d/%d groups"
            % (broken_groups, len(sp.groups)))
    k = next(k for k in A if A[k].dtype in FLOATS)
    T = OrderedDict(U)
    flip = bits(T[k]).clone().reshape(-1)
    flip[0] ^= 1
    T[k] = flip.view(T[k].dtype).reshape(T[k].shape)
    k_int = [k for k in A if A[k].dtype == torch.int64]
    if k_int:
        T[k_int[0]] = T[k_int[0]] + 1
    bad = count_changed(A, T)
    rep.add(name, "neg_bits", None, bad == 1 + bool(k_int),
            "1-ulp flip in %s%s detected (%d tensors differ)"
            % (k, " and +1 in " + k_int[0] if k_int else "", bad))
    if k_int:
        T2 = OrderedDict(U)
        T2[k_int[0]] = T2[k_int[0]].to(torch.int32)
        rep.add(name, "neg_dtype", None, bool(layout_diff(A, T2)),
                "int64 -> int32 of %s detected: %s" % (k_int[0], layout_diff(A, T2)))


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=gen.DEFAULT_OUT, help="gen.py output (default %(default)s)")
    ap.add_argument("--work", default=None, help="scratch dir (default: a new temp dir)")
    ap.add_argument("--models", default=",".join(gen.MODELS), help="comma-separated subset")
    ap.add_argument("--tol", type=float, default=1e-4, help="max abs logit diff (default 1e-4)")
    ap.add_argument("--self-test", action="store_true",
                    help="check the PyTorch side with a pure-PyTorch permutation (no CLI)")
    ap.add_argument("--out", default=None, help="table file (default torch_check.txt or "
                                                "torch_selftest.txt beside this script)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in gen.MODELS]
    if unknown:
        sys.exit("check_torch: unknown model(s) %s; known: %s" % (unknown, ",".join(gen.MODELS)))
    missing = [n + s for n in names for s in ("", "_b")
               if not os.path.isfile(os.path.join(args.data, n + s, "model.safetensors"))]
    if missing:
        print("check_torch: no checkpoints for %s under %s; run tests/golden/specs/gen.py first"
              % (missing[:4], args.data), file=sys.stderr)
        sys.exit(2)
    b = None if args.self_test else find_bin()
    work = args.work or tempfile.mkdtemp(prefix="mf-golden-check-")
    rep = Report()
    for n in names:
        if args.self_test:
            self_model(rep, args.data, work, n, args.tol)
        else:
            cli_model(rep, b, args.data, work, n, args.tol)
    out = args.out or os.path.join(HERE, "torch_selftest.txt" if args.self_test else "torch_check.txt")
    header = ("# check_torch.py %s  torch %s  tol %g  data %s"
              % ("--self-test (pure-PyTorch stand-in for the CLI)" if args.self_test
                 else "binary " + os.path.relpath(b, REPO), torch.__version__, args.tol, args.data))
    rep.write(out, header)
    print("%d passed, %d failed  (table: %s)" % (len(rep.rows) - rep.failed, rep.failed,
                                                  os.path.relpath(out, os.getcwd())))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
