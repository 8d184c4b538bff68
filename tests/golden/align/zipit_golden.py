#!/usr/bin/env python3
"""Golden values for tests/align/align_zipit.rs: a small numpy reference run of ZipIt!
(Stoica et al. 2023), written from the paper's description, independently of the crate.

Two random MLPs [5, 6, 4, 3] (ReLU, PyTorch layout: weight (out, in)), 40 inputs.
For each hidden layer (group) l of width n:
  - features: the post-ReLU outputs of both models on the inputs, concatenated to 2n
    columns [A's units, B's units];
  - C = Pearson correlation (population covariance / outer(std, std));
  - greedy matching: candidate pairs (i < j) scored C[i, j] across models and
    alpha * C[i, j] within a model (none when alpha = 0), sorted by score descending
    (ties by (i, j)); a pair is taken when both features are unmatched and, within a
    model, that model has budget left (floor(beta * n / 2) within-model pairs each),
    until n pairs;
  - merged unit k = the k-th pair in order of its smaller index; merge matrix M
    (n x 2n, 1/2 at both members), unmerge U (2n x n, 1 at both members).
Full zipping (the paper's formula): W_l' = M_l blockdiag(W_l^A, W_l^B) U_{l-1},
b_l' = M_l [b_l^A; b_l^B]; the output layer averages: W' = 1/2 [W^A W^B] U, b' = mean.
Partial zipping of the first k = 1 layer: shared layer 0, then each model's own layers
reading the shared features through its block of U; logits are the mean of both tails'.

Emits the models, inputs, per configuration the pairs of each group, the merged
parameters and logits, and the partially zipped logits.

Run: /path/to/venv/bin/python tests/golden/align/zipit_golden.py > tests/golden/align/zipit.txt
"""
import numpy as np

rng = np.random.default_rng(20261202)
SIZES = [5, 6, 4, 3]
L = len(SIZES) - 1


def emit(name, arr):
    arr = np.asarray(arr, dtype=np.float64)
    print(name, " ".join(str(d) for d in arr.shape), "|", " ".join(repr(float(v)) for v in arr.ravel()))


def model():
    m = {}
    for i in range(L):
        m[f"layers.{i}.weight"] = rng.standard_normal((SIZES[i + 1], SIZES[i])) * 0.7
        m[f"layers.{i}.bias"] = rng.standard_normal(SIZES[i + 1]) * 0.3 + 0.3
    return m


def relu(z):
    return np.maximum(z, 0.0)


def hidden(m, x):
    hs, h = [], x
    for i in range(L - 1):
        h = relu(h @ m[f"layers.{i}.weight"].T + m[f"layers.{i}.bias"])
        hs.append(h)
    return hs


def logits(m, x):
    h = hidden(m, x)[-1] if L > 1 else x
    return h @ m[f"layers.{L - 1}.weight"].T + m[f"layers.{L - 1}.bias"]


def correlation(f):
    c = np.cov(f, rowvar=False, bias=True)
    s = np.sqrt(np.diag(c))
    return c / np.outer(s, s)


def zip_match(c, alpha, beta):
    two_n = c.shape[0]
    n = two_n // 2
    cands = []
    for i in range(two_n):
        for j in range(i + 1, two_n):
            cross = (i < n) != (j < n)
            if cross:
                cands.append((c[i, j], i, j))
            elif alpha > 0:
                cands.append((alpha * c[i, j], i, j))
    cands.sort(key=lambda t: (-t[0], t[1], t[2]))
    budget = [int(np.floor(beta * n / 2 + 1e-9))] * 2
    used = [False] * two_n
    pairs = []
    for _, i, j in cands:
        if used[i] or used[j]:
            continue
        if (i < n) == (j < n):
            mdl = 0 if i < n else 1
            if budget[mdl] == 0:
                continue
            budget[mdl] -= 1
        used[i] = used[j] = True
        pairs.append((i, j))
        if len(pairs) == n:
            break
    assert len(pairs) == n
    pairs.sort()
    M = np.zeros((n, two_n))
    U = np.zeros((two_n, n))
    for k, (i, j) in enumerate(pairs):
        M[k, i] = M[k, j] = 0.5
        U[i, k] = U[j, k] = 1.0
    return pairs, M, U


def blockdiag(p, q):
    out = np.zeros((p.shape[0] + q.shape[0], p.shape[1] + q.shape[1]))
    out[: p.shape[0], : p.shape[1]] = p
    out[p.shape[0]:, p.shape[1]:] = q
    return out


a, b = model(), model()
x = rng.standard_normal((40, 5)).astype(np.float32).astype(np.float64)  # the crate's data sets hold f32
y = np.arange(40) % 3
names = [f"layers.{i}.{k}" for i in range(L) for k in ("weight", "bias")]
for k in names:
    emit("a." + k, a[k])
for k in names:
    emit("b." + k, b[k])
emit("x", x)
emit("y", y)

ha, hb = hidden(a, x), hidden(b, x)
corrs = []
for l in range(L - 1):
    f = np.concatenate([ha[l], hb[l]], axis=1)
    assert np.all(np.std(f, axis=0) > 1e-3), "a constant unit: pick another seed"
    corrs.append(correlation(f))

for tag, alpha, beta in [("full", 1.0, 1.0), ("half", 0.5, 0.5), ("cross", 0.0, 1.0)]:
    mats = [zip_match(c, alpha, beta) for c in corrs]
    for l, (pairs, _, _) in enumerate(mats):
        emit(f"{tag}.pairs.hidden.{l}", np.array(pairs))
    merged = {}
    for l in range(L):
        Wab = blockdiag(a[f"layers.{l}.weight"], b[f"layers.{l}.weight"])
        bab = np.concatenate([a[f"layers.{l}.bias"], b[f"layers.{l}.bias"]])
        if l == 0:
            Wab = np.concatenate([a["layers.0.weight"], b["layers.0.weight"]], axis=0)
        else:
            Wab = Wab @ mats[l - 1][2]
        if l < L - 1:
            Ml = mats[l][1]
            merged[f"layers.{l}.weight"] = Ml @ Wab
            merged[f"layers.{l}.bias"] = Ml @ bab
        else:
            out = SIZES[-1]
            merged[f"layers.{l}.weight"] = 0.5 * (Wab[:out] + Wab[out:])
            merged[f"layers.{l}.bias"] = 0.5 * (a[f"layers.{l}.bias"] + b[f"layers.{l}.bias"])
    for k in names:
        emit(f"{tag}.merged.{k}", merged[k])
    emit(f"{tag}.logits", logits(merged, x))

    # partial zipping of the first layer: shared layer 0, two tails
    _, M0, U0 = mats[0]
    n0 = SIZES[1]
    W0 = M0 @ np.concatenate([a["layers.0.weight"], b["layers.0.weight"]], axis=0)
    b0 = M0 @ np.concatenate([a["layers.0.bias"], b["layers.0.bias"]])
    h = relu(x @ W0.T + b0)
    tails = []
    for m, Ublock in [(a, U0[:n0]), (b, U0[n0:])]:
        t = relu((h @ Ublock.T) @ m["layers.1.weight"].T + m["layers.1.bias"])
        tails.append(t @ m["layers.2.weight"].T + m["layers.2.bias"])
    emit(f"{tag}.partial1.logits", 0.5 * (tails[0] + tails[1]))
