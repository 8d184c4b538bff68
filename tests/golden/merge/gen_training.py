"""Reference outputs for the training-time averagers (SWAD, PAPA, HWA) in
modelfusion::merge, written independently of the Rust code with numpy.

SWAD is computed offline from the paper's definition of the window (Cha et al. 2021):
t_s is the first segment whose loss is the minimum of the n_converge losses starting
there, the threshold is (1 + r) times their mean, t_e the first segment i > t_s whose
next n_tolerance losses (cut at the end) all exceed it; the model is the mean of every
iterate in segments t_s..t_e (the last segment's mean when no t_s exists).

PAPA and HWA are reference runs: K members on quadratic per-step objectives, SGD with
momentum and L2 weight decay in PyTorch's form, a cosine learning-rate factor.

Run from the crate root: venv/bin/python tests/golden/merge/gen_training.py
"""

import json
import math

import numpy as np

OUT = "tests/golden/merge/training.json"


def iterate(k):
    return {
        "w": [math.sin(0.3 * k), math.cos(0.5 * k), k / 10.0],
        "b": [0.1 * k * k - k],
    }


def swad_offline(losses, lengths, nc, nt, r):
    n = len(losses)
    segs, k = [], 0
    for length in lengths:
        segs.append([iterate(k + j) for j in range(length)])
        k += length
    start = None
    for i in range(0, n - nc + 1):
        w = losses[i : i + nc]
        if losses[i] == min(w):
            start = i
            break
    if start is None:
        chosen = segs[-1]
        window = None
    else:
        thr = np.mean(losses[start : start + nc]) * (1.0 + r)
        end = n
        for i in range(start + 1, n):
            if min(losses[i : i + nt]) > thr:
                end = i
                break
        chosen = [it for s in segs[start:end] for it in s]
        window = [start, end]
    mean = {
        key: np.mean([np.array(it[key]) for it in chosen], axis=0).tolist()
        for key in ("w", "b")
    }
    return {
        "losses": losses,
        "lengths": lengths,
        "n_converge": nc,
        "n_tolerance": nt,
        "tolerance_ratio": r,
        "window": window,
        "iterates": len(chosen),
        "average": mean,
    }


def swad_cases():
    cases = [
        # falls, flattens, dies: the default rule
        swad_offline(
            [5, 4, 3, 2.5, 2.4, 2.6, 2.45, 2.5, 3.5, 3.6, 3.7, 3.8, 3.9, 4.0, 4.1, 4.2],
            [4] * 16, 3, 6, 0.3),
        # never converges (strictly decreasing)
        swad_offline([5, 4, 3, 2, 1], [3] * 5, 3, 6, 0.3),
        # valley alive at the end, the last two segments above the threshold
        swad_offline([3, 2, 1, 1.1, 1.05, 1.0, 1.2, 2.0, 2.5], [2, 3, 1, 4, 2, 2, 3, 1, 2],
                     2, 4, 0.2),
        # n_tolerance 1, ratio 0: ends at the first loss above the valley's mean
        swad_offline([2, 1, 1, 1.5, 0.9, 0.8], [1] * 6, 2, 1, 0.0),
        # ties at the minimum
        swad_offline([1, 1, 1, 1, 1, 1, 1], [2] * 7, 3, 2, 0.0),
    ]
    rng = np.random.default_rng(15)
    for _ in range(12):
        n = int(rng.integers(1, 25))
        losses = [round(float(x), 3) for x in rng.uniform(1.0, 2.0, n)]
        lengths = [int(x) for x in rng.integers(1, 5, n)]
        nc = int(rng.integers(1, 5))
        nt = int(rng.integers(1, 7))
        r = round(float(rng.uniform(0.0, 0.5)), 3)
        cases.append(swad_offline(losses, lengths, nc, nt, r))
    return cases


K, P = 3, 3
rng = np.random.default_rng(7)
TARGETS = [[{"w": rng.normal(size=3), "b": rng.normal(size=1)} for _ in range(P)] for _ in range(K)]
SCALES = [{"w": rng.uniform(0.5, 1.5, 3), "b": rng.uniform(0.5, 1.5, 1)} for _ in range(K)]
INIT = {"w": np.array([0.5, -0.5, 1.0]), "b": np.array([2.0])}
LR, MOMENTUM, WD = 0.1, 0.9, 1e-3


def cosine(step, steps):
    return 0.5 * (1.0 + math.cos(math.pi * step / steps))


def run(steps, after_step):
    members = [{k: v.copy() for k, v in INIT.items()} for _ in range(K)]
    bufs = [{k: np.zeros_like(v) for k, v in INIT.items()} for _ in range(K)]
    for step in range(steps):
        lr = LR * cosine(step, steps)
        for j in range(K):
            c = TARGETS[j][step % P]
            for key in ("w", "b"):
                g = SCALES[j][key] * (members[j][key] - c[key]) + WD * members[j][key]
                bufs[j][key] = MOMENTUM * bufs[j][key] + g
                members[j][key] = members[j][key] - lr * bufs[j][key]
        after_step(step, members)
    return members


def mean_of(members):
    return {key: sum(m[key] for m in members) / len(members) for key in ("w", "b")}


def papa_ema(alpha, every, steps):
    def pull(step, members):
        if (step + 1) % every == 0:
            mean = mean_of(members)
            for m in members:
                for key in m:
                    m[key] = alpha * m[key] + (1 - alpha) * mean[key]

    members = run(steps, pull)
    return {"rule": "ema", "alpha": alpha, "every": every, "steps": steps,
            "members": [tolist(m) for m in members], "average": tolist(mean_of(members))}


def papa_all(every, steps):
    def pull(step, members):
        if (step + 1) % every == 0:
            mean = mean_of(members)
            for m in members:
                for key in m:
                    m[key] = mean[key].copy()

    members = run(steps, pull)
    return {"rule": "all", "every": every, "steps": steps,
            "members": [tolist(m) for m in members], "average": tolist(mean_of(members))}


def hwa(sync_every, window, steps):
    online = []

    def sync(step, members):
        if (step + 1) % sync_every == 0:
            mean = mean_of(members)
            for m in members:
                for key in m:
                    m[key] = mean[key].copy()
            online.append(mean)

    members = run(steps, sync)
    if steps % sync_every != 0:
        mean = mean_of(members)
        members = [{k: v.copy() for k, v in mean.items()} for _ in range(K)]
        online.append(mean)
    last = online[-window:]
    return {"rule": "hwa", "sync_every": sync_every, "window": window, "steps": steps,
            "members": [tolist(m) for m in members], "average": tolist(mean_of(last))}


def fge_lr(step, cycle, high, low):
    t = ((step % cycle) + 1) / cycle
    if t <= 0.5:
        return (1 - 2 * t) * high + 2 * t * low
    return (2 - 2 * t) * low + (2 * t - 1) * high


def single_run(steps, lr_at, after_step, quantize_grad=None):
    """Member 0 alone (SGD with momentum, weight decay), lr_at(step) absolute."""
    m = {k: v.copy() for k, v in INIT.items()}
    buf = {k: np.zeros_like(v) for k, v in INIT.items()}
    for step in range(steps):
        c = TARGETS[0][step % P]
        grad = {key: SCALES[0][key] * (m[key] - c[key]) for key in m}
        if quantize_grad is not None:
            grad = quantize_grad(grad, step)
        for key in m:
            g = grad[key] + WD * m[key]
            buf[key] = MOMENTUM * buf[key] + g
            m[key] = m[key] - lr_at(step) * buf[key]
        m = after_step(step, m)
    return m


def fge(cycle, high, low, steps):
    snaps = []

    def snap(step, m):
        if step % cycle + 1 == cycle // 2:
            snaps.append(tolist(m))
        return m

    single_run(steps, lambda s: fge_lr(s, cycle, high, low), snap)
    return {"cycle": cycle, "lr_high": high, "lr_low": low, "steps": steps,
            "lr": [fge_lr(s, cycle, high, low) for s in range(steps)], "snapshots": snaps}


def quantize_nearest(m, bits):
    out = {}
    for key, x in m.items():
        x = np.asarray(x, dtype=float)
        top = np.max(np.abs(x))
        if top == 0:
            out[key] = np.zeros_like(x)
            continue
        delta = 2.0 ** (math.floor(math.log2(top)) - (bits - 2))
        v = x / delta
        code = np.sign(v) * np.floor(np.abs(v) + 0.5)
        code = np.clip(code, -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1)
        out[key] = delta * code
    return out


def swalp(bits, swa_start, every, steps):
    collected = []

    def after(step, m):
        m = quantize_nearest(m, bits)
        if step >= swa_start and (step - swa_start) % every == 0:
            collected.append({k: v.copy() for k, v in m.items()})
        return m

    global INIT
    saved = INIT
    INIT = quantize_nearest(INIT, bits)
    last = single_run(steps, lambda s: LR, after, lambda g, s: quantize_nearest(g, bits))
    INIT = saved
    return {"bits": bits, "swa_start": swa_start, "every": every, "steps": steps,
            "last": tolist(last), "average": tolist(mean_of(collected)), "count": len(collected)}


def twa(steps):
    rng = np.random.default_rng(21)
    iterates = [{"w": rng.normal(size=3), "b": rng.normal(size=1)} for _ in range(3)]
    flat = [np.concatenate([it["b"], it["w"]]) for it in iterates]  # names sorted: b, w
    basis = []
    for v in flat:
        size = np.linalg.norm(v)
        r = v.copy()
        for _ in range(2):
            for q in basis:
                r = r - np.dot(q, r) * q
        n = np.linalg.norm(r)
        if n > 1e-6 * size and n > 0:
            basis.append(r / n)
    center = np.mean(flat, axis=0)
    coords = np.zeros(len(basis))
    buf = np.zeros(len(basis))
    scale = np.concatenate([SCALES[0]["b"], SCALES[0]["w"]])
    for step in range(steps):
        w = center + sum(c * q for c, q in zip(coords, basis))
        t = TARGETS[0][step % P]
        target = np.concatenate([t["b"], t["w"]])
        grad = scale * (w - target)
        g = np.array([np.dot(q, grad) + WD * np.dot(q, w) for q in basis])
        buf = MOMENTUM * buf + g
        coords = coords - LR * cosine(step, steps) * buf
    w = center + sum(c * q for c, q in zip(coords, basis))
    return {"steps": steps, "iterates": [tolist(it) for it in iterates],
            "model": {"b": w[:1].tolist(), "w": w[1:].tolist()}}


def tolist(m):
    return {k: np.asarray(v).tolist() for k, v in m.items()}


def main():
    out = {
        "swad": swad_cases(),
        "population": {
            "lr": LR, "momentum": MOMENTUM, "weight_decay": WD, "period": P,
            "init": tolist(INIT),
            "targets": [[tolist(t) for t in ts] for ts in TARGETS],
            "scales": [tolist(s) for s in SCALES],
            "runs": [papa_ema(0.8, 3, 23), papa_ema(0.5, 1, 10), papa_all(4, 23),
                     hwa(4, 3, 23), hwa(5, 2, 20), hwa(1, 1, 7)],
            "fge": [fge(6, 0.05, 0.0005, 19), fge(2, 0.1, 0.1, 5)],
            "swalp": [swalp(6, 5, 2, 30), swalp(3, 0, 1, 12)],
            "twa": [twa(30)],
        },
    }
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
