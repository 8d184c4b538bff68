#!/usr/bin/env python3
"""Golden values for tests/align/align_ste.rs and the unit tests of src/align/sinkhorn.rs,
written independently of the crate (JAX autodiff for every gradient, scipy for the
assignment).

1. STE matching (Git Re-Basin): a one-hidden-layer MLP [5, 7, 3] (one permutation
   group, so weight matching is a single assignment on
   C = W0_T W0_B^T + b0_T b0_B^T + W1_T^T W1_B), full-batch mean cross-entropy on 16
   samples. The proxy starts at A; each step P = argmax_P <C(proxy, B), P>, midpoint
   (A + P(B)) / 2, gradient g of the loss there (jax.grad), Adam (PyTorch form) on the
   proxy with gradient g / 2. Emits the loss of every step and the final permutation
   (matched once more against the final proxy).
2. Differentiable re-basin, one step: soft permutation P = Sinkhorn(S / tau) (log-domain
   row then column normalisation, n_iter times), P(B) = (P W0, P b0, W1 P^T); the
   data-free loss ||A - P(B)||^2 and the midpoint cross-entropy, and their gradients
   with respect to S (jax.grad through the unrolled iterations).

Run: venv/bin/python tests/golden/align/ste_golden.py > tests/golden/align/ste.txt
"""
import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

rng = np.random.default_rng(20261201)
NAMES = ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]


def emit(name, arr):
    arr = np.asarray(arr, dtype=np.float64)
    print(name, " ".join(str(d) for d in arr.shape), "|", " ".join(repr(float(v)) for v in arr.ravel()))


def model(scale):
    return {
        "layers.0.weight": rng.standard_normal((7, 5)) * scale,
        "layers.0.bias": rng.standard_normal(7) * 0.1,
        "layers.1.weight": rng.standard_normal((3, 7)) * scale,
        "layers.1.bias": rng.standard_normal(3) * 0.1,
    }


a, b = model(0.8), model(0.8)
# features are f32 in the crate's data sets: round them the same way
x = rng.standard_normal((16, 5)).astype(np.float32).astype(np.float64)
y = np.arange(16) % 3
for k in NAMES:
    emit("a." + k, a[k])
for k in NAMES:
    emit("b." + k, b[k])
emit("x", x)
emit("y", y)


def loss(m):
    h = jax.nn.relu(x @ m["layers.0.weight"].T + m["layers.0.bias"])
    logits = h @ m["layers.1.weight"].T + m["layers.1.bias"]
    logp = jax.nn.log_softmax(logits, axis=1)
    return -jnp.mean(logp[jnp.arange(len(y)), y])


grad = jax.jit(jax.value_and_grad(loss))


def match(t, m):
    c = (
        t["layers.0.weight"] @ m["layers.0.weight"].T
        + np.outer(t["layers.0.bias"], m["layers.0.bias"])
        + t["layers.1.weight"].T @ m["layers.1.weight"]
    )
    return linear_sum_assignment(c, maximize=True)[1]


def permute(perm, m):
    return {
        "layers.0.weight": m["layers.0.weight"][perm],
        "layers.0.bias": m["layers.0.bias"][perm],
        "layers.1.weight": m["layers.1.weight"][:, perm],
        "layers.1.bias": m["layers.1.bias"],
    }


STEPS, LR, B1, B2, EPS = 30, 0.05, 0.9, 0.999, 1e-8
proxy = {k: v.copy() for k, v in a.items()}
mom = {k: np.zeros_like(v) for k, v in a.items()}
sec = {k: np.zeros_like(v) for k, v in a.items()}
history, perms = [], []
for t in range(1, STEPS + 1):
    perm = match(proxy, b)
    perms.append(perm)
    pb = permute(perm, b)
    mid = {k: 0.5 * (a[k] + pb[k]) for k in NAMES}
    value, g = grad(mid)
    history.append(float(value))
    for k in NAMES:
        gk = 0.5 * np.asarray(g[k])
        mom[k] = B1 * mom[k] + (1 - B1) * gk
        sec[k] = B2 * sec[k] + (1 - B2) * gk * gk
        step = LR / (1 - B1**t)
        proxy[k] = proxy[k] - step * mom[k] / (np.sqrt(sec[k]) / np.sqrt(1 - B2**t) + EPS)
emit("ste.history", history)
emit("ste.first_perm", perms[0])
emit("ste.perm", match(proxy, b))
emit("ste.distinct_perms", [len({tuple(p) for p in perms})])

# differentiable re-basin: one loss and gradient at given logits
TAU, N_ITER = 0.5, 8
s = rng.standard_normal((7, 7))
emit("sinkhorn.logits", s)


def sinkhorn(s):
    z = s / TAU
    for _ in range(N_ITER):
        z = z - jax.scipy.special.logsumexp(z, axis=1, keepdims=True)
        z = z - jax.scipy.special.logsumexp(z, axis=0, keepdims=True)
    return jnp.exp(z)


def soft_b(s):
    p = sinkhorn(s)
    return {
        "layers.0.weight": p @ b["layers.0.weight"],
        "layers.0.bias": p @ b["layers.0.bias"],
        "layers.1.weight": b["layers.1.weight"] @ p.T,
        "layers.1.bias": jnp.asarray(b["layers.1.bias"]),
    }


def distance(s):
    pb = soft_b(s)
    return sum(jnp.sum((pb[k] - a[k]) ** 2) for k in NAMES)


def midpoint(s):
    pb = soft_b(s)
    return loss({k: 0.5 * (a[k] + pb[k]) for k in NAMES})


emit("sinkhorn.p", sinkhorn(s))
for name, f in [("distance", distance), ("midpoint", midpoint)]:
    value, g = jax.value_and_grad(f)(s)
    emit(f"sinkhorn.{name}.loss", [value])
    emit(f"sinkhorn.{name}.grad", g)
