"""Reference runs for the learned-coefficient methods in modelfusion::merge
(AdaMerging, the learned soup, subspace learning), written independently of the Rust
code with numpy.

The network is a ReLU MLP [4, 5, 3] in PyTorch layout (layers.{i}.weight (out, in),
layers.{i}.bias (out)); every loss is full-batch on 8 fixed inputs (rounded to float32,
as the crate's data sets store them), so no random stream has to agree.

- AdaMerging, layer-wise (one lambda per task per tensor): merged = base + sum_i
  lambda[i, t] tau_i, loss = mean Shannon entropy of softmax(logits), plain SGD
  (lr 2.0) on lambda from 0.3, clipped to [0, 1] after every step, 6 steps.
- Learned soup (one weight per ingredient): soup = sum_i softmax(beta)_i theta_i,
  loss = mean cross-entropy on labels, plain SGD (lr 2.0) on beta from 0, 6 steps.
- Subspace line: the loss (cross-entropy) at alpha_0 theta_0 + alpha_1 theta_1 for a
  fixed schedule of alphas, endpoint i gets alpha_i * grad, SGD with momentum 0.9
  (PyTorch's form, one buffer per endpoint), lr 0.1, 6 steps.

Run from the crate root: python tests/golden/merge/gen_learned.py
"""

import json

import numpy as np

OUT = "tests/golden/merge/learned.json"
SIZES = [4, 5, 3]
NAMES = ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]


def init(rng):
    p = {}
    for i in range(len(SIZES) - 1):
        p[f"layers.{i}.weight"] = rng.normal(0, 0.8, (SIZES[i + 1], SIZES[i]))
        p[f"layers.{i}.bias"] = rng.normal(0, 0.3, SIZES[i + 1])
    return p


def forward(p, x):
    h0 = x
    z0 = h0 @ p["layers.0.weight"].T + p["layers.0.bias"]
    h1 = np.maximum(z0, 0.0)
    z1 = h1 @ p["layers.1.weight"].T + p["layers.1.bias"]
    return z1, (h0, h1)


def backward(p, cache, dz1):
    h0, h1 = cache
    g = {}
    g["layers.1.weight"] = dz1.T @ h1
    g["layers.1.bias"] = dz1.sum(0)
    dh1 = dz1 @ p["layers.1.weight"]
    dz0 = dh1 * (h1 > 0)
    g["layers.0.weight"] = dz0.T @ h0
    g["layers.0.bias"] = dz0.sum(0)
    return g


def log_softmax(z):
    m = z.max(1, keepdims=True)
    return z - (m + np.log(np.exp(z - m).sum(1, keepdims=True)))


def entropy(p, x):
    z, cache = forward(p, x)
    logp = log_softmax(z)
    pr = np.exp(logp)
    h = -(pr * logp).sum(1)
    n = x.shape[0]
    dz = -pr * (logp + h[:, None]) / n
    return h.mean(), backward(p, cache, dz)


def cross_entropy(p, x, y):
    z, cache = forward(p, x)
    logp = log_softmax(z)
    n = x.shape[0]
    loss = -logp[np.arange(n), y].mean()
    dz = np.exp(logp)
    dz[np.arange(n), y] -= 1.0
    return loss, backward(p, cache, dz / n)


def enc(p):
    return {k: {"shape": list(v.shape), "data": v.ravel().tolist()} for k, v in p.items()}


def main():
    rng = np.random.default_rng(15)
    x = rng.normal(0, 1, (8, 4)).astype(np.float32).astype(np.float64)
    y = rng.integers(0, 3, 8)

    # AdaMerging, layer-wise.
    base = init(rng)
    tuned = [{k: v + rng.normal(0, 0.7, v.shape) for k, v in base.items()} for _ in range(2)]
    taus = [{k: t[k] - base[k] for k in NAMES} for t in tuned]
    lam = np.full((2, len(NAMES)), 0.3)
    ada_losses = []
    for _ in range(6):
        merged = {k: base[k] + sum(lam[i, j] * taus[i][k] for i in range(2)) for j, k in enumerate(NAMES)}
        loss, g = entropy(merged, x)
        ada_losses.append(loss)
        grad = np.array([[np.sum(g[k] * taus[i][k]) for k in NAMES] for i in range(2)])
        lam = np.clip(lam - 2.0 * grad, 0.0, 1.0)
    ada_final_loss = entropy(
        {k: base[k] + sum(lam[i, j] * taus[i][k] for i in range(2)) for j, k in enumerate(NAMES)}, x
    )[0]

    # Learned soup, global weights.
    ingredients = [init(rng) for _ in range(3)]
    beta = np.zeros(3)
    soup_losses = []
    for _ in range(6):
        w = np.exp(beta - beta.max())
        w /= w.sum()
        soup = {k: sum(w[i] * ingredients[i][k] for i in range(3)) for k in NAMES}
        loss, g = cross_entropy(soup, x, y)
        soup_losses.append(loss)
        G = np.array([sum(np.sum(g[k] * ingredients[i][k]) for k in NAMES) for i in range(3)])
        beta = beta - 2.0 * w * (G - np.dot(w, G))
    w = np.exp(beta - beta.max())
    w /= w.sum()

    # Subspace line with a fixed schedule of points.
    ends = [init(rng) for _ in range(2)]
    inits = [enc(e) for e in ends]
    bufs = [{k: np.zeros_like(v) for k, v in e.items()} for e in ends]
    schedule = [[0.3, 0.7], [0.9, 0.1], [0.5, 0.5]]
    line_losses = []
    for s in range(6):
        a = schedule[s % len(schedule)]
        at = {k: a[0] * ends[0][k] + a[1] * ends[1][k] for k in NAMES}
        loss, g = cross_entropy(at, x, y)
        line_losses.append(loss)
        for i in range(2):
            for k in NAMES:
                bufs[i][k] = 0.9 * bufs[i][k] + a[i] * g[k]
                ends[i][k] = ends[i][k] - 0.1 * bufs[i][k]

    out = {
        "sizes": SIZES,
        "x": x.tolist(),
        "y": y.tolist(),
        "adamerging": {
            "base": enc(base),
            "tuned": [enc(t) for t in tuned],
            "lr": 2.0,
            "steps": 6,
            "losses": ada_losses,
            "final_loss": ada_final_loss,
            "coefficients": lam.tolist(),
        },
        "soup": {
            "ingredients": [enc(i) for i in ingredients],
            "lr": 2.0,
            "steps": 6,
            "losses": soup_losses,
            "weights": w.tolist(),
        },
        "line": {
            "inits": inits,
            "schedule": schedule,
            "lr": 0.1,
            "momentum": 0.9,
            "steps": 6,
            "losses": line_losses,
            "endpoints": [enc(e) for e in ends],
        },
    }
    return out


if __name__ == "__main__":
    result = main()
    with open(OUT, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", OUT)
