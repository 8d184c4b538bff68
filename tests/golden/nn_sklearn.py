"""Golden values for the nn module from scikit-learn (run from the repository root):

    venv/bin/python tests/golden/nn_sklearn.py

Writes tests/golden/nn_sklearn_mlp.txt (loss and gradients of a ReLU MLP with softmax
cross-entropy, from sklearn's MLPClassifier._backprop) and tests/golden/nn_sklearn_digits.txt
(class counts and per-class pixel sums of sklearn.datasets.load_digits). The Rust test
tests/nn/nn_golden.rs rebuilds the same parameters and inputs from the formulas below.
"""
import os
import warnings

import numpy as np
import sklearn
from sklearn.datasets import load_digits
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import LabelBinarizer

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = [5, 4, 3, 3]
N = 8


def param_value(m, k):
    """Element k (row-major, PyTorch layout) of parameter number m."""
    return 0.5 * np.sin(1.3 * k + 0.7 * m + 0.1)


def torch_params():
    params = []
    m = 0
    for i in range(len(SIZES) - 1):
        fan_in, out = SIZES[i], SIZES[i + 1]
        w = np.array([param_value(m, k) for k in range(out * fan_in)]).reshape(out, fan_in)
        m += 1
        b = np.array([param_value(m, k) for k in range(out)])
        m += 1
        params.append((f"layers.{i}", w, b))
    return params


def main():
    X = np.array([[np.cos(0.9 * i + 0.45 * j + 0.2) for j in range(SIZES[0])] for i in range(N)])
    y = np.array([i % SIZES[-1] for i in range(N)])
    clf = MLPClassifier(hidden_layer_sizes=SIZES[1:-1], activation="relu", alpha=0.0, max_iter=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(X, y)
    params = torch_params()
    clf.coefs_ = [w.T.copy() for _, w, _ in params]  # sklearn stores (in, out)
    clf.intercepts_ = [b.copy() for _, _, b in params]
    Y = LabelBinarizer().fit(y).transform(y).astype(float)
    activations = [X] + [None] * (len(SIZES) - 1)
    deltas = [None] * (len(SIZES) - 1)
    coef_grads = [np.empty_like(c) for c in clf.coefs_]
    intercept_grads = [np.empty_like(b) for b in clf.intercepts_]
    loss, coef_grads, intercept_grads = clf._backprop(
        X, Y, None, activations, deltas, coef_grads, intercept_grads
    )
    logits = X
    for i, (_, w, b) in enumerate(params):
        logits = logits @ w.T + b
        if i + 1 < len(params):
            logits = np.maximum(logits, 0.0)
    with open(os.path.join(HERE, "nn_sklearn_mlp.txt"), "w") as f:
        f.write(f"# scikit-learn {sklearn.__version__}, MLPClassifier._backprop, sizes {SIZES}, {N} samples\n")
        f.write("loss " + repr(float(loss)) + "\n")
        f.write("logits " + " ".join(repr(float(v)) for v in logits.ravel()) + "\n")
        for (name, _, _), gw, gb in zip(params, coef_grads, intercept_grads):
            f.write(f"{name}.weight " + " ".join(repr(float(v)) for v in gw.T.ravel()) + "\n")
            f.write(f"{name}.bias " + " ".join(repr(float(v)) for v in gb.ravel()) + "\n")

    digits = load_digits()
    with open(os.path.join(HERE, "nn_sklearn_digits.txt"), "w") as f:
        f.write(f"# scikit-learn {sklearn.__version__}, load_digits: class counts, per-class sums of raw pixel values (0..16)\n")
        counts = np.bincount(digits.target, minlength=10)
        f.write("counts " + " ".join(str(int(c)) for c in counts) + "\n")
        sums = [digits.data[digits.target == c].sum() for c in range(10)]
        f.write("pixel_sums " + " ".join(repr(float(s)) for s in sums) + "\n")
        f.write("last_row " + " ".join(str(int(v)) for v in digits.data[-1]) + " " + str(int(digits.target[-1])) + "\n")


if __name__ == "__main__":
    main()
