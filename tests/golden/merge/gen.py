"""Golden values for modelfusion::merge, written independently from the papers' formulas.

Run: venv/bin/python tests/golden/merge/gen.py   (writes the JSON files next to it)

Every case stores its inputs and the expected output, all float64. Conventions that are
choices, not paper facts (documented in the Rust rustdoc too):
- TIES keeps k = max(1, floor(density * n)) entries of largest magnitude per task vector
  (mergekit 0.1.5; these inputs have no ties), elects + where the weighted sum is >= 0.
- SLERP falls back to lerp when |cos| > 0.9995 (mergekit).
- Model stock is computed per tensor; a pair with a zero task vector counts as cos 0.
- Fisher entries are floored: max(F, floor).
- RegMean: G~ = alpha * G + (1 - alpha) * diag(G); W^T = (sum G~_i)^-1 sum G~_i W_i^T.
"""
import json
import math
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(20240607)


def t(a):
    a = np.asarray(a, dtype=np.float64)
    return {"shape": list(a.shape), "data": a.reshape(-1).tolist()}


def model(d):
    return {k: t(v) for k, v in d.items()}


SHAPES = {"fc.weight": (4, 6), "fc.bias": (4,), "out.weight": (3, 4)}


def random_model(scale=1.0):
    return {k: rng.normal(size=s) * scale for k, s in SHAPES.items()}


def write(name, obj):
    with open(os.path.join(HERE, name), "w") as f:
        json.dump(obj, f, indent=None, separators=(",", ":"))
        f.write("\n")


# ---------------------------------------------------------------- TIES
def ties(base, models, weights, density, lam):
    out = {}
    for k in base:
        taus = []
        for m in models:
            tau = (m[k] - base[k]).reshape(-1)
            n = tau.size
            kk = min(max(int(density * n), 1), n)
            keep = np.zeros(n, dtype=bool)
            keep[np.argsort(-np.abs(tau), kind="stable")[:kk]] = True
            taus.append(np.where(keep, tau, 0.0))
        taus = np.stack(taus)
        w = np.asarray(weights)[:, None]
        elected = np.where((w * taus).sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(w * taus) == elected
        num = (w * taus * agree).sum(0)
        den = (w * agree).sum(0)
        merged = num / np.where(den != 0, den, 1.0)
        out[k] = base[k] + lam * merged.reshape(base[k].shape)
    return out


cases = []
for density, lam, weights in [(0.2, 1.0, [1.0, 1.0, 1.0]), (0.5, 0.7, [0.3, 1.0, 2.0]), (1.0, 1.0, [1.0, 1.0, 1.0])]:
    base = random_model()
    models = [{k: v + rng.normal(size=v.shape) * 0.5 for k, v in base.items()} for _ in range(3)]
    cases.append({
        "density": density, "lambda": lam, "weights": weights,
        "base": model(base), "models": [model(m) for m in models],
        "expected": model(ties(base, models, weights, density, lam)),
    })
write("ties.json", cases)


# ---------------------------------------------------------------- DARE with fixed masks
def dare(base, models, masks, weights, p, lam, rescale, sign):
    out = {}
    for k in base:
        taus = []
        for m, mk in zip(models, masks):
            tau = (m[k] - base[k]).reshape(-1)
            keep = mk[k].reshape(-1)
            kept = np.where(keep, tau, 0.0)
            if rescale == "inverse":
                kept = kept / p
            elif rescale == "l1":
                s = np.abs(kept).sum()
                kept = kept * (np.abs(tau).sum() / s if s > 0 else 1.0)
            taus.append(kept)
        taus = np.stack(taus)
        w = np.asarray(weights)[:, None]
        if sign:
            elected = np.sign((w * taus).sum(0))
            agree = (np.sign(taus) == elected) & (taus != 0)
            num = (w * taus * agree).sum(0)
            den = (w * agree).sum(0)
            merged = np.where(den != 0, num / np.where(den != 0, den, 1.0), 0.0)
        else:
            merged = (w * taus).sum(0)
        out[k] = base[k] + lam * merged.reshape(base[k].shape)
    return out


cases = []
for p, lam, rescale, sign, weights in [
    (0.3, 1.0, "inverse", False, [1.0, 1.0]),
    (0.5, 0.8, "l1", False, [0.4, 0.6]),
    (0.4, 1.0, "inverse", True, [1.0, 2.0]),
]:
    base = random_model()
    models = [{k: v + rng.normal(size=v.shape) * 0.5 for k, v in base.items()} for _ in range(2)]
    masks = [{k: rng.random(size=v.shape) < p for k, v in base.items()} for _ in range(2)]
    cases.append({
        "density": p, "lambda": lam, "rescale": rescale, "sign_election": sign, "weights": weights,
        "base": model(base), "models": [model(m) for m in models],
        "masks": [{k: v.reshape(-1).astype(int).tolist() for k, v in mk.items()} for mk in masks],
        "expected": model(dare(base, models, masks, weights, p, lam, rescale, sign)),
    })
write("dare.json", cases)


# ---------------------------------------------------------------- SLERP
def slerp(a, b, tt):
    out = {}
    for k in a:
        x, y = a[k].reshape(-1), b[k].reshape(-1)
        c = x @ y / (np.linalg.norm(x) * np.linalg.norm(y))
        if abs(c) > 0.9995:
            r = (1 - tt) * x + tt * y
        else:
            om = math.acos(max(-1.0, min(1.0, c)))
            r = math.sin((1 - tt) * om) / math.sin(om) * x + math.sin(tt * om) / math.sin(om) * y
        out[k] = r.reshape(a[k].shape)
    return out


cases = []
for tt in [0.3, 0.75]:
    a = random_model()
    b = random_model()
    # One near-collinear tensor to exercise the lerp fallback.
    b["fc.bias"] = a["fc.bias"] * 1.7 + rng.normal(size=a["fc.bias"].shape) * 1e-4
    cases.append({"t": tt, "models": [model(a), model(b)], "expected": model(slerp(a, b, tt))})
write("slerp.json", cases)


# ---------------------------------------------------------------- Model stock
def model_stock(base, models):
    out = {}
    n = len(models)
    for k in base:
        taus = [(m[k] - base[k]).reshape(-1) for m in models]
        cs = []
        for i in range(n):
            for j in range(i + 1, n):
                d = np.linalg.norm(taus[i]) * np.linalg.norm(taus[j])
                cs.append(taus[i] @ taus[j] / d if d > 0 else 0.0)
        c = float(np.mean(cs))
        r = n * c / (1 + (n - 1) * c)
        out[k] = r * np.mean([m[k] for m in models], axis=0) + (1 - r) * base[k]
    return out


cases = []
for n in [2, 3]:
    base = random_model()
    shared = {k: rng.normal(size=v.shape) * 0.3 for k, v in base.items()}
    models = [{k: v + shared[k] + rng.normal(size=v.shape) * 0.3 for k, v in base.items()} for _ in range(n)]
    cases.append({"base": model(base), "models": [model(m) for m in models], "expected": model(model_stock(base, models))})
write("model_stock.json", cases)


# ---------------------------------------------------------------- Fisher
def fisher(models, fishers, coefs, floor):
    out = {}
    for k in models[0]:
        num = sum(c * np.maximum(f[k], floor) * m[k] for m, f, c in zip(models, fishers, coefs))
        den = sum(c * np.maximum(f[k], floor) for f, c in zip(fishers, coefs))
        out[k] = num / den
    return out


cases = []
for coefs, floor in [([1.0, 1.0, 1.0], 1e-6), ([0.5, 1.0, 2.0], 1e-3)]:
    models = [random_model() for _ in range(3)]
    fishers = [{k: rng.random(size=v.shape) ** 4 for k, v in models[0].items()} for _ in range(3)]
    fishers[0]["fc.bias"][0] = 0.0  # exercises the floor
    cases.append({
        "coefficients": coefs, "floor": floor,
        "models": [model(m) for m in models], "fishers": [model(f) for f in fishers],
        "expected": model(fisher(models, fishers, coefs, floor)),
    })
write("fisher.json", cases)


# ---------------------------------------------------------------- RegMean
def regmean(models, inputs, alpha):
    out = {}
    for k in models[0]:
        if k in inputs[0]:
            gs = []
            for x in inputs:
                xs = np.concatenate(x[k], axis=0)
                g = xs.T @ xs / xs.shape[0]
                gs.append(alpha * g + (1 - alpha) * np.diag(np.diag(g)))
            a = sum(gs)
            rhs = sum(g @ m[k].T for g, m in zip(gs, models))
            out[k] = np.linalg.solve(a, rhs).T
        else:
            out[k] = np.mean([m[k] for m in models], axis=0)
    return out


cases = []
for alpha in [0.9, 0.5]:
    models = [random_model() for _ in range(3)]
    # Two batches per model; layer inputs: fc sees 6 features, out sees 4.
    inputs = [
        {
            "fc.weight": [rng.normal(size=(5, 6)) @ np.diag(rng.random(6) + 0.2) for _ in range(2)],
            "out.weight": [rng.normal(size=(7, 4)) for _ in range(2)],
        }
        for _ in range(3)
    ]
    cases.append({
        "alpha": alpha, "models": [model(m) for m in models],
        "inputs": [{k: [t(b) for b in v] for k, v in x.items()} for x in inputs],
        "expected": model(regmean(models, inputs, alpha)),
    })
write("regmean.json", cases)
print("wrote golden files to", HERE)
